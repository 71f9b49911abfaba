"""The bit widths and group sizes mlx.core.quantize takes. Kept apart from remap.ops.quant (which
needs numpy) so that the CLI can name them in --help without importing numpy."""

MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
