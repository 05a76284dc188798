"""common/cli.py's logging: lines go to the stderr of the moment, never to a stream closed since."""
from __future__ import annotations

import io
import logging
import sys

from common.cli import configure_logging


def test_log_lines_follow_stderr_after_the_stream_they_were_configured_on_is_closed(monkeypatch):
    """What in-process `main()` calls do between tests: each test's stderr is replaced and closed after it."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging(quiet=False)
    logging.getLogger("preprocess.engine.build").info("one")
    assert first.getvalue() == "one\n"
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("preprocess.engine.build").info("two")  # a plain StreamHandler: "--- Logging error ---"
    logging.getLogger("train.fit").debug("below the level")
    assert second.getvalue() == "two\n"
    configure_logging(quiet=True)
    logging.getLogger("train.fit").info("quiet")
    logging.getLogger("train.fit").warning("a warning")
    assert second.getvalue() == "two\na warning\n"
