"""pytest: the doctests of an integration module are collected only where its framework is
installed (importing the module without it raises the ImportError that names the extra)."""

import importlib.util

collect_ignore = [f"{name}.py" for name in ("lightning", "transformers") if importlib.util.find_spec(name) is None]
