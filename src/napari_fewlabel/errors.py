"""The one exception type for problems a user can cause and fix.

Every error that comes from the user's input (a file that cannot be read, a
labels layer of the wrong shape, no labelled slice, a path that cannot be
written, a CUDA device that ran out of memory) is raised as
:class:`FewLabelError` with a message that says what happened *and what to do*.
The CLI turns it into exit code 2, the napari widgets into a notification.
Anything else escaping the library is a bug.
"""

from __future__ import annotations


class FewLabelError(Exception):
    """A problem with the user's input, with a sentence saying what to do.

    Examples
    --------
    >>> raise FewLabelError("No labelled slice found: paint at least one slice.")
    Traceback (most recent call last):
    ...
    napari_fewlabel.errors.FewLabelError: No labelled slice found: paint at least one slice.
    """
