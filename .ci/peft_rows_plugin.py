"""pytest plugin for .ci/peft_hira_rows.sh: PEFT's HiRA rows against this tuner, and proof that they used it."""

import hira
from peft import mapping
from peft.utils import PeftType


_created = []
_init = hira.HiraModel.__init__


def _counting_init(self, *args, **kwargs):
    _created.append(type(self).__name__)
    _init(self, *args, **kwargs)


def pytest_configure(config):
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HIRA] is hira.HiraModel
    hira.HiraModel.__init__ = _counting_init


def pytest_sessionfinish(session, exitstatus):
    print(f"\nhira.HiraModel instances created by PEFT's HiRA rows: {len(_created)}")
    if session.testscollected and not _created:
        raise RuntimeError("PEFT's HiRA rows never created hira.HiraModel: they did not test this tuner")
