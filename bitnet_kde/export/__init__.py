"""File formats a trained student is written in: `native` (packed ternary safetensors + config)."""
