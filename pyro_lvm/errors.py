"""Errors that carry a message for the user.

A :class:`UserError` is bad input: the command line prints its one-line message (which names the
problem and the fix) and exits with status 2, without a traceback. Anything else that escapes is a
bug in pyro-lvm and exits with status 1.
"""


class UserError(Exception):
    """Bad input from the user; ``str(err)`` is one line naming the problem and the fix."""

    exit_status = 2


# PyTorch's words when one operation gets tensors on two devices.
DEVICE_MISMATCH = "Expected all tensors to be on the same device"


def mixed_devices_message(text, owner="the model"):
    """A model that builds CPU tensors (``torch.zeros(3)``) fails on a GPU: say so, and how to fix it."""
    return (f"{owner} mixes devices ({text}); create its tensors on the device of the data or of its "
            f"parameters (x.new_zeros(...), torch.zeros(..., device=x.device), a registered buffer), "
            f"or fit with --device cpu")
