"""JSON from files the package did not write: decoded, parsed and bounded in one place,
each failure raised as the caller's own error class, naming where it came from."""
import json

BLANK = object()  # what parse_json(..., skip_blank=True) returns for whitespace only


def parse_json(raw, where, error, object_pairs_hook=None, hint="", skip_blank=False):
    """The value that raw (bytes) holds as UTF-8 JSON, or error(message) saying why not:
    not UTF-8 (at which byte), not valid JSON (+ hint), or nested too deeply (Python's
    parser recurses; a hostile file must not reach the recursion limit as a traceback).
    skip_blank: text that is only whitespace gives BLANK instead of an error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    if skip_blank and not text.strip():
        return BLANK
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
