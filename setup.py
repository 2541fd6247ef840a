"""Package layout only (metadata lives in pyproject.toml).

conf/ stays at the top of the repository, where Hydra users expect it, and ships inside the
wheel as the package ``kdlib.conf``; an editable install maps the same name to the same folder,
so both kinds of install find the configs through ``importlib``.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages("src") + ["kdlib.conf"],
    package_dir={"": "src", "kdlib.conf": "conf"},
)
