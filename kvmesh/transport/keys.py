"""Actor identities: one CurveZMQ keypair per actor and per operator, and the key ring
that says which public key may be which actor in which role.

A key directory (cluster.toml's `security.key_dir`, written by `kvmesh keys generate`):

    <name>.key          public: name, role, public key (TOML); every node holds all of them
    <name>.key_secret   the same plus the secret key, mode 0600; a node holds only the
                        secrets of the actors it runs (and the operator's, where
                        `kvmesh status` runs)
    cluster.hash_key    the secret that keys every KV block hash (kvmesh.kv.block_hash),
                        mode 0600; every node needs it (frontends and workers must hash
                        alike). Without a key directory, a per-user one is made on first
                        use ($XDG_CACHE_HOME/kvmesh/hash_key): a one-host cluster's actors
                        all read the same.

`name` is an actor id of the cluster (router-0, decode-1, ...) with that actor's role
("worker" for a prefill or decode worker of a cluster with a planner, which may switch
it between the two), or an operator (role "operator": `kvmesh status`, a person's
tools), whose connections say Hello as `<name>` or `<name>:<anything>`, so several may
be open at once.

Who proves what:
    bound socket     the ZAP handler admits a client only if its public key is in the
                     ring, and ZeroMQ stamps every message of that connection with the
                     key's name (the frame's "User-Id"): a Hello must name that actor
                     and role, and events on a bound SUB/PULL are that actor's
    connected socket the client pins the server's public key (curve_serverkey) from the
                     ring by the actor id it means to reach: it completes a handshake
                     only with that actor

The ring rereads the directory when it meets a name or key it does not know (at most
once a second), so a node added later (its keys dropped into every node's directory)
is admitted without restarting the others.

The directory must be this user's and not writable by anyone else (whoever can add a
`.key` file can add an actor); secret files must be owner-only, as ssh requires.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import zmq

from kvmesh.transport.private_dir import own_dir, private_dir

OPERATOR = "operator"
SWITCHING = "worker"  # the key role of a worker a planner moves between SWITCHING_ROLES
SWITCHING_ROLES = frozenset({"prefill", "decode"})
ACTOR_ROLES = ("router", "frontend", "prefill", "decode", "cache", "planner")
KEY_ROLES = (*ACTOR_ROLES, SWITCHING, OPERATOR)
RELOAD_INTERVAL = 1.0  # seconds between rereads of the directory for an unknown key
HASH_KEY_FILE = "cluster.hash_key"
HASH_KEY_BYTES = 32


def plays(role: str | None, senders: frozenset[str]) -> bool:
    """May an actor of `role` (a key's or a Hello's) send what `senders` may send? A
    "worker" key plays both worker roles: its planner moves it between them."""
    if role == SWITCHING:
        return bool(senders & SWITCHING_ROLES)
    return role in senders


@dataclass(frozen=True)
class Identity:
    """Who a public key is: a name (actor id, or an operator's name) and its role."""

    name: str
    role: str
    public: bytes  # z85, as ZeroMQ's curve options take it

    def admits(self, actor_id: str, role: str) -> bool:
        """May a connection holding this key say Hello as actor_id in role? A "worker"
        key (a cluster with a planner) is its worker's in either worker role."""
        if self.role == SWITCHING:
            return role in SWITCHING_ROLES and actor_id == self.name
        if role != self.role:
            return False
        if self.role == OPERATOR:
            return actor_id == self.name or actor_id.startswith(f"{self.name}:")
        return actor_id == self.name


def check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise ValueError(
            f"key name {name!r}: expected letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return name


def write_identity(key_dir: Path, name: str, role: str, *, force: bool = False) -> bool:
    """Write name's keypair into key_dir; False when it exists and force is not set."""
    check_name(name)
    if role not in KEY_ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(KEY_ROLES)}")
    public_file, secret_file = key_dir / f"{name}.key", key_dir / f"{name}.key_secret"
    if not force and (public_file.exists() or secret_file.exists()):
        return False
    public, secret = zmq.curve_keypair()
    head = f'name = "{name}"\nrole = "{role}"\npublic_key = "{public.decode()}"\n'
    _write(
        secret_file,
        "# kvmesh actor key: SECRET, keep it on the node that runs "
        f'{name}\n{head}secret_key = "{secret.decode()}"\n',
        0o600,
    )
    _write(public_file, f"# kvmesh actor key: public, give it to every node\n{head}", 0o644)
    return True


def _write(path: Path, text: str, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(temporary, mode)  # whatever the umask
    os.replace(temporary, path)


def generate(key_dir: Path, identities: list[tuple[str, str]], *, force: bool = False) -> list[str]:
    """Keypairs for every (name, role) that has none in key_dir (all of them with
    force), and the block-hash key if there is none (a new one with force: every
    cached block then misses); returns the names written. The directory is made 0700."""
    key_dir = Path(key_dir)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_dir(key_dir)
    written = [
        name for name, role in identities if write_identity(key_dir, name, role, force=force)
    ]
    if force or not (key_dir / HASH_KEY_FILE).exists():
        _write(key_dir / HASH_KEY_FILE, secrets.token_hex(HASH_KEY_BYTES) + "\n", 0o600)
    return written


def hash_key(key_dir: str | os.PathLike | None) -> bytes:
    """The secret keying KV block hashes: key_dir's cluster.hash_key, or without a key
    directory this user's own (made on first use)."""
    if key_dir is None:
        path = _user_hash_key()
    else:
        check_dir(Path(key_dir))
        path = Path(key_dir) / HASH_KEY_FILE
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist: make it with `kvmesh keys generate DIR` "
            "and give it to every node"
        ) from None
    if info.st_mode & 0o077 or info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
        raise ValueError(
            f"{path} must be this user's regular file, mode 600 (it is "
            f"{info.st_mode & 0o777:o}, uid {info.st_uid})"
        )
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != HASH_KEY_BYTES:
        raise ValueError(f"{path}: expected {2 * HASH_KEY_BYTES} hex digits")
    return key


def _user_hash_key() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = private_dir(Path(base) / "kvmesh" / "keys", "the per-user hash key") / "hash_key"
    if not path.exists():  # whole or not at all: written aside, then linked in once
        temporary = path.with_name(f".hash_key.{os.getpid()}")
        _write(temporary, secrets.token_hex(HASH_KEY_BYTES) + "\n", 0o600)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: everyone reads that one
        finally:
            temporary.unlink()
    return path


def check_dir(key_dir: Path) -> None:
    """Refuse a key directory another user could add a key to."""
    try:
        info = own_dir(key_dir, "security.key_dir")
    except FileNotFoundError:
        raise ValueError(
            f"security.key_dir: {str(key_dir)!r} does not exist; make the keys "
            "with `kvmesh keys generate DIR`"
        ) from None
    if info.st_mode & 0o022:
        raise ValueError(
            f"security.key_dir: {str(key_dir)!r} is writable by others "
            f"(mode {info.st_mode & 0o777:o}): anyone could add a key; "
            "chmod 700 it"
        )


def _read(path: Path) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return tomllib.load(f)


class KeyRing:
    """The identities of one key directory, and this process's own keypair."""

    def __init__(self, key_dir: str | os.PathLike, own: str) -> None:
        """own: the name whose secret this process holds (an actor id, or an
        operator's name)."""
        self.key_dir = Path(key_dir)
        check_dir(self.key_dir)
        self._by_name: dict[str, Identity] = {}
        self._by_public: dict[bytes, Identity] = {}
        self._loaded_at = -RELOAD_INTERVAL
        self.own, self.secret = self._load_own(own)
        self.reload()

    def _load_own(self, name: str) -> tuple[Identity, bytes]:
        path = self.key_dir / f"{name}.key_secret"
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise ValueError(
                f"security.key_dir {str(self.key_dir)!r} has no {path.name}: make the "
                f"cluster's keys with `kvmesh keys generate DIR --config cluster.toml` and "
                f"copy {path.name} to this node"
            ) from None
        if info.st_mode & 0o077 or info.st_uid != os.getuid():
            raise ValueError(
                f"{path} must be this user's and mode 600 (it is "
                f"{info.st_mode & 0o777:o}, uid {info.st_uid})"
            )
        data = _read(path)
        identity = self._identity(data, path)
        secret = data.get("secret_key", "").encode()
        if len(secret) != 40 or zmq.curve_public(secret) != identity.public:
            raise ValueError(f"{path}: secret_key does not match its public_key")
        return identity, secret

    def _identity(self, data: dict, path: Path) -> Identity:
        try:
            identity = Identity(data["name"], data["role"], data["public_key"].encode())
        except (KeyError, AttributeError):
            raise ValueError(f"{path}: expected name, role and public_key") from None
        stem = path.name.removesuffix("_secret").removesuffix(".key")
        if identity.name != stem or identity.role not in KEY_ROLES or len(identity.public) != 40:
            raise ValueError(
                f"{path}: name {identity.name!r} must match the file name, "
                f"role {identity.role!r} be one of {', '.join(KEY_ROLES)}, "
                "and public_key be 40 z85 characters"
            )
        return identity

    def reload(self) -> None:
        """Reread every public key of the directory; a bad file is skipped, not fatal
        (one broken key must not lock a whole node out)."""
        by_name, by_public = {}, {}
        for path in sorted(self.key_dir.glob("*.key")):
            try:
                identity = self._identity(_read(path), path)
            except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
                import structlog

                structlog.get_logger(__name__).warning(
                    "key_skipped", path=str(path), error=str(exc)
                )
                continue
            by_name[identity.name] = identity
            by_public[identity.public] = identity
        self._by_name, self._by_public = by_name, by_public
        self._loaded_at = time.monotonic()

    def _reload_soon(self) -> None:
        if time.monotonic() - self._loaded_at >= RELOAD_INTERVAL:
            self.reload()

    def by_public(self, public: bytes) -> Identity | None:
        """The identity of a z85 public key, or None."""
        if public not in self._by_public:
            self._reload_soon()
        return self._by_public.get(public)

    def identity(self, name: str) -> Identity:
        """The identity called name; ValueError when the directory has no such key."""
        if name not in self._by_name:
            self._reload_soon()
        identity = self._by_name.get(name)
        if identity is None:
            raise ValueError(
                f"security.key_dir {str(self.key_dir)!r} has no {name}.key: "
                f"no key says who {name!r} is"
            )
        return identity
