"""Control: presets, their schema and hot reload, OBS bridge."""
