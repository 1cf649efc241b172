"""``medfl data``: which MedMNIST files the data directory holds; optionally download some."""

from __future__ import annotations

import sys
from collections import Counter

from medformer.data import (
    DataError,
    data_status,
    dataset_path,
    get_info,
    register_data_dir,
    resolve_data_dir,
)

BAD_STATUSES = ("md5-mismatch", "unreadable")


def parse_download_spec(spec: str) -> tuple[str, int]:
    """``"FLAG"`` or ``"FLAG@SIZE"`` -> ``(flag, size)``; :class:`DataError` when malformed."""
    flag, _, size_s = spec.strip().partition("@")
    flag = flag.strip().lower()
    get_info(flag)  # UnknownDatasetError listing the valid flags
    if not size_s:
        return flag, 28
    try:
        size = int(size_s)
    except ValueError:
        raise DataError(f"--download {spec!r}: size must be an integer, e.g. {flag}@64") from None
    return flag, size


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


def run_data_command(data_dir: str | None, download: list[str] | None = None) -> int:
    """Print the status table of every official MedMNIST file and a summary; return the exit code.

    Returns 2 when a present file fails its MD5 check or cannot be read, or a download fails;
    0 otherwise (missing files are normal: only some subsets are needed).
    """
    directory = resolve_data_dir(data_dir)
    try:
        register_data_dir(directory)  # imported datasets (dataset cards) are listed too
    except DataError as e:
        print(f"medfl data: {e}", file=sys.stderr)
        return 2
    for spec in download or []:
        try:
            flag, size = parse_download_spec(spec)
            path = dataset_path(flag, size, directory, download=True, verify=True)
        except DataError as e:
            print(f"medfl data: {e}", file=sys.stderr)
            return 2
        print(f"ok: {path}")

    status = data_status(directory)
    rows = [
        {
            "flag": r["flag"],
            "size": str(r["size"]),
            "modality": get_info(r["flag"]).modality,
            "task": get_info(r["flag"]).task,
            "status": r["status"],
            "path": r["path"] if r["status"] != "missing" else "-",
        }
        for r in status
    ]
    print(_table(rows, ["flag", "size", "modality", "task", "status", "path"]))
    counts = Counter(r["status"] for r in status)
    note = "" if directory.is_dir() else " (folder does not exist)"
    print(
        f"{counts['present']} present, {counts['md5-mismatch']} md5-mismatch, "
        f"{counts['unreadable']} unreadable, {counts['missing']} missing of {len(status)} "
        f"official files in {directory}{note}"
    )
    bad = [r for r in status if r["status"] in BAD_STATUSES]
    for r in bad:
        print(
            f"medfl data: {r['path']}: {r['status']} - the file is corrupt or modified; delete it "
            f"and download it again (medfl data --download {r['flag']}@{r['size']})",
            file=sys.stderr,
        )
    return 2 if bad else 0
