"""Package list for setuptools; everything else is in pyproject.toml.

pyproject.toml cannot say "every studio* package, plus studio._resources mapped from the top-level resources/
folder" (find only sees folders that exist under their own name), so the list is computed here. resources/ stays
at the top of the checkout where the GUI and tests find it; the wheel carries it as studio/_resources.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["studio", "studio.*"]), "studio._resources"])
