"""Keys and who they act for: projects and roles from the key file and the environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genserve.api.auth import KeyFile, KeyStore, Principal, Window, duration
from genserve.api.errors import APIError


def test_key_file_records_project_and_role(tmp_path: Path) -> None:
    keys = KeyFile(tmp_path / "keys.json")
    admin, admin_rec = keys.create("ops", None, None, project="team-x", role="admin")
    member, member_rec = keys.create("bot", 60, None, project="team-x")
    other, _ = keys.create("alice", None, None)  # no project given: `default`, a member
    stored = json.loads(keys.path.read_text())
    assert [(r["project"], r["role"]) for r in stored] == [
        ("team-x", "admin"), ("team-x", "member"), ("default", "member"),
    ]  # fmt: skip
    assert admin not in keys.path.read_text()  # hashes only

    store = KeyStore((), keys.path)
    assert store.verify(f"Bearer {admin}").principal == Principal(admin_rec.id, "team-x", "admin")
    assert store.verify(f"Bearer {member}").principal == Principal(
        member_rec.id, "team-x", "member"
    )
    assert store.verify(f"Bearer {other}").principal.project == "default"
    with pytest.raises(ValueError, match="role"):
        keys.create("x", None, None, role="root")
    with pytest.raises(ValueError, match="project"):
        keys.create("x", None, None, project="../etc")


def test_a_key_file_from_before_projects_loads_into_default_as_members(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    old = {"id": "ab12", "name": "old", "hash": "0" * 64, "created": 1, "rpm": None, "tpm": None}
    path.write_text(json.dumps([{**old, "revoked": False}]))
    (record,) = KeyFile(path).load()
    assert (record.project, record.role) == ("default", "member")


def test_environment_keys_are_their_own_projects_unless_the_file_says_otherwise(
    tmp_path: Path,
) -> None:
    keys = KeyFile(tmp_path / "keys.json")
    store = KeyStore(("sk-a", "sk-b"), None, admin_keys=("sk-admin",))
    a, b = store.verify("Bearer sk-a").principal, store.verify("Bearer sk-b").principal
    admin = store.verify("Bearer sk-admin").principal
    assert a.project != b.project and a.role == b.role == "member"
    assert admin.is_admin and admin.project not in (a.project, b.project)
    assert "sk-a" not in a.project and "sk-a" not in a.key_id
    # The project is the key's, not its place in the list.
    assert KeyStore(("sk-b", "sk-a"), None).verify("Bearer sk-a").principal == a
    # A key given in both places takes its project and role from the key file.
    from genserve.api.auth import KeyRecord, hash_key

    record = KeyRecord("cafe", "shared", hash_key("sk-a"), 1, project="team-x", role="admin")
    keys.save([record])
    both = KeyStore(("sk-a",), keys.path).verify("Bearer sk-a").principal
    assert both == Principal("cafe", "team-x", "admin")
    with pytest.raises(APIError) as e:
        store.verify("Bearer sk-nope")
    assert e.value.status == 401


def test_keys_cli_creates_and_lists_project_and_role(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genserve.cli import app

    path = str(tmp_path / "keys.json")
    runner = CliRunner()
    made = runner.invoke(
        app, ["keys", "create", "--name", "ops", "--project", "team-x", "--role", "admin",
              "--key-file", path],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "project: team-x" in made.output and "role: admin" in made.output
    listed = runner.invoke(app, ["keys", "list", "--key-file", path]).output
    assert "project=team-x" in listed and "role=admin" in listed
    bad = runner.invoke(
        app, ["keys", "create", "--name", "x", "--role", "root", "--key-file", path]
    )
    assert bad.exit_code != 0 and len(KeyFile(Path(path)).load()) == 1


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (1, "1s"), (54.2, "54.2s"), (59.9996, "1m0s"), (360, "6m0s"),
     (90.25, "1m30.25s")],
)  # fmt: skip
def test_reset_times_read_as_openais(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_a_window_resets_when_its_newest_entry_leaves_and_has_room_sooner() -> None:
    w = Window()
    w.requests.extend([0.0, 20.0, 40.0])
    w.tokens.extend([(0.0, 3), (20.0, 12), (40.0, 1)])
    assert w.requests_reset(50.0) == 50.0  # the request at 40 leaves at 100
    assert w.requests_room(50.0, 3) == 10.0  # the one at 0 leaves at 60: room for one more
    assert w.requests_room(50.0, 2) == 30.0  # a limit lowered since: two must leave
    assert w.tokens_reset(50.0) == 50.0
    # 16 tokens against 10: the 3 at 0 leaving leaves 13, still over; the 12 at 20 must go too.
    assert w.tokens_room(50.0, 10) == 30.0
    assert w.tokens_room(50.0, 20) == 0.0  # under the limit already
