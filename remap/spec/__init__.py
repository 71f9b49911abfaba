"""The spec language: YAML mapping files, their schema, name patterns and size expressions."""
