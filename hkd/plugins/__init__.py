"""Built-in hkd plugins. Each module is registered by name exactly like a third-party plugin."""
