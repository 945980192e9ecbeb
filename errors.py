"""
How bad input fails, written once for every module and script (it imports nothing heavy, so any file can use it).

- `BadSample`: one record or image that cannot be used. The message names the file, the record and what is
  wrong; `reason` is a short tag a training run counts skipped samples by (a bad record never stops a run).
  images.py, datafiles.py, formats.py, data.py and evals/ raise it.
- `fail`: bad input to a script (a flag, a checkpoint, a dataset that cannot open): one line on stderr,
  `script: error: message`, and exit status 2, as argparse does for a bad flag, without the usage block.
- `short`: a value of a record as a message shows it (a record may hold anything, of any size).
"""
import reprlib
import sys


class BadSample(ValueError):
    """Input that cannot be used (an image, any record of a dataset or a benchmark): the message names the file
    and the sample, `reason` is a short tag a training run counts skipped samples by."""

    def __init__(self, where, message, reason):
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.reason = where, message, reason

    def __reduce__(self):  # picklable (DataLoader workers under spawn) with its three fields
        return BadSample, (self.where, self.message, self.reason)


def fail(script, message):
    """`script: error: message` on stderr and exit status 2."""
    print(f"{script}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 3, 4, 4


def short(value):
    """A repr cut short in length and depth."""
    return _repr.repr(value)
