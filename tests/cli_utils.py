"""Helpers shared by the tests of the command line and the training entry points.

Import the fixture into a test module to use it there (it is autouse within that module)::

    from cli_utils import fresh_accelerate_state  # noqa: F401
"""

from __future__ import annotations

import pytest

from visionlin import cli


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """``accelerate`` keeps its process state in class attributes: reset it after each test, so a test's mixed
    precision, device or process count never leaks into the next one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def usage_error(capsys, argv: list[str], usage: str | None = None) -> str:
    """Run ``visionlin *argv`` expecting a usage error: exit status 2, no traceback, ``usage`` (when given) in the
    message. Returns standard error."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if usage is not None:
        assert usage in err
    return err
