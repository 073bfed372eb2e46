"""Built-in compute backends (installed as ``rbe_backends``): one directory per backend, each with
``ops.py`` (the kernels) and ``__init__.py`` (the Backend class and its registration hook)."""
