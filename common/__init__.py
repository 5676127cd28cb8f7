"""What every package of the project shares: the base class of user-facing errors."""

from common.errors import UserError

__all__ = ["UserError"]
