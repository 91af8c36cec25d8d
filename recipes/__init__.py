"""The recipes: each module implements the small protocol in ``launcher/recipe.py``."""

from types import ModuleType

from recipes import bert

RECIPES: dict[str, ModuleType] = {"bert": bert}
