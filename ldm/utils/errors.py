"""The one exception type for user mistakes: train.py/sample.py print it as one line and exit 2."""


class UserError(ValueError):
    """A bad input the user can fix (config value, file path, checkpoint kind). Message is one
    line."""
