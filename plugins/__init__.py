"""Built-in codec and geometry plugins (installed as ``rbe_plugins``).

Each module is registered through the ``rbe`` entry-point group in pyproject.toml, exactly like a
third-party plugin.
"""
