"""A plugin that cannot be imported, to show commlmo reports it by distribution and carries on."""

import commlmo_dependency_that_does_not_exist  # noqa: F401

class Broken:  # never reached
    pass
