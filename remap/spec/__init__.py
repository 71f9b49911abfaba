"""The spec language: YAML mapping files, their schema and name patterns (size expressions are
remap.expr, shared with the ops)."""
