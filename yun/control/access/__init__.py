"""Who may see and do what (T-ID, U-SEC): scopes over projects and the role checks.

Every finder of the control server takes a :class:`Scope`; a resource outside it is
answered as not found, so its existence is not leaked. Role checks name the role the
caller lacks.
"""

from yun.control.access.policy import (
    Permission,
    Scope,
    require,
    require_in_project,
    scope_for,
)

__all__ = ["Permission", "Scope", "require", "require_in_project", "scope_for"]
