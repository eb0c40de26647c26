"""The arena_battles table: one row per battle vote, never updated or deleted.

Only storage lives here: what a battle may hold, and what the votes add up to, are decided by the callers. Each
thread uses its own connection (align.registry.catalog.Connections).
"""

from __future__ import annotations

import json

from align.registry.catalog import Tables, utc_now


class ArenaTables(Tables):
    def add_battle(self, key: str, battle: dict) -> tuple[int, bool]:
        """Store one vote in one transaction: `battle` holds the fields battles() gives but the id and the time.
        `key` is drawn when the battle starts. Returns (battle id, duplicate): the same key twice is stored once."""
        with self.transaction():
            found = self.db.execute("SELECT id FROM arena_battles WHERE battle_key = ?", (key,)).fetchone()
            if found is not None:
                return found["id"], True
            cursor = self.db.execute(
                "INSERT INTO arena_battles (arena, battle_key, model_left, model_right, messages_left, "
                "messages_right, settings, annotator, choice, seconds, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    battle["arena"],
                    key,
                    battle["left"],
                    battle["right"],
                    json.dumps(battle["left_messages"], ensure_ascii=False),
                    json.dumps(battle["right_messages"], ensure_ascii=False),
                    json.dumps(battle["settings"], sort_keys=True),
                    battle["annotator"],
                    battle["choice"],
                    battle["seconds"],
                    utc_now(),
                ),
            )
            return cursor.lastrowid, False

    def battles(self, arena: str, *, upto: int | None = None) -> list[dict]:
        """The arena's battles, oldest first (`upto`: only those up to that id), each a dict: id, arena, left, right
        (model references), left_messages, right_messages, choice, annotator, settings, seconds, created_at."""
        query, args = "SELECT * FROM arena_battles WHERE arena = ?", [arena]
        if upto is not None:
            query += " AND id <= ?"
            args.append(upto)
        return [
            {
                "id": row["id"],
                "arena": row["arena"],
                "left": row["model_left"],
                "right": row["model_right"],
                "left_messages": json.loads(row["messages_left"]),
                "right_messages": json.loads(row["messages_right"]),
                "choice": row["choice"],
                "annotator": row["annotator"],
                "settings": json.loads(row["settings"]),
                "seconds": row["seconds"],
                "created_at": row["created_at"],
            }
            for row in self.db.execute(query + " ORDER BY id", args).fetchall()
        ]

    def last_battle(self, arena: str) -> int | None:
        """The id of the arena's newest battle, None before the first vote."""
        return self.db.execute("SELECT MAX(id) FROM arena_battles WHERE arena = ?", (arena,)).fetchone()[0]

    def arenas(self) -> list[tuple[str, int]]:
        """(arena, votes) for every arena with a vote."""
        found = self.db.execute("SELECT arena, COUNT(*) AS votes FROM arena_battles GROUP BY arena ORDER BY arena")
        return [(row["arena"], row["votes"]) for row in found.fetchall()]
