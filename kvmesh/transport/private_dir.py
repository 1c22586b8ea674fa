"""Directories only this user can reach: the disk tier's and ipc_dir's.

On a shared node (a Slurm allocation, a login host) another user must not read cached
KV (it is the users' prompts, in another form), plant blocks for a cluster to serve, or
swap a directory for a symlink into someone else's files. So such a directory is
created 0700, and an existing one is refused when it is a symlink or another user's;
group or other permission bits on our own are removed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(path: str | os.PathLike, key: str) -> Path:
    """`path`, created (parents too) or checked as above; errors name the config `key`."""
    path = Path(path)
    if own_dir(path, key, create=True).st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def own_dir(path: Path, key: str, *, create: bool = False) -> os.stat_result:
    """The lstat of directory `path` (made 0700 first when `create`), refused naming the
    config `key` when it is a symlink, not a directory, or another user's.
    FileNotFoundError when it does not exist and is not to be created."""
    if path.is_symlink():  # before mkdir: nothing is ever made through a link
        raise ValueError(f"{key}: {str(path)!r} is a symbolic link; give the real directory")
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{key}: {str(path)!r} is not a directory")
    if info.st_uid != os.getuid():
        raise ValueError(
            f"{key}: {str(path)!r} belongs to uid {info.st_uid}, not to this "
            f"user (uid {os.getuid()}); use a directory of your own"
        )
    return info
