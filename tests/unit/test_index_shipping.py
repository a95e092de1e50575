"""A retriever on a node without the driver's index unpacks the packed copy into its own index folder, once."""

from raylign.actors.retriever import local_index, pack_index
from raylign.config import RagConfig


def test_a_node_without_the_index_unpacks_the_shipped_copy_once(tmp_path, monkeypatch):
    built = tmp_path / "driver" / "3f2a9c0d1e2b4a5c"
    (built / "chroma").mkdir(parents=True)
    (built / "chroma" / "chroma.sqlite3").write_bytes(bytes(range(256)) * 40)
    (built / "chunks.jsonl").write_text('{"id": "c1"}\n')
    (built / "READY").write_text("")
    packed = pack_index(str(built))
    calls = []

    def fetch() -> bytes:
        calls.append(1)
        return packed

    rag = RagConfig(index_dir=str(tmp_path / "driver"))
    assert local_index(str(built), rag, fetch) == (str(built), False) and calls == []  # same node: no copy
    monkeypatch.setenv("RAYLIGN_INDEX_DIR", str(tmp_path / "node_c"))
    path, unpacked = local_index(str(built), rag, fetch)
    assert unpacked and path == str(tmp_path / "node_c" / built.name) and calls == [1]
    for rel in ("chroma/chroma.sqlite3", "chunks.jsonl", "READY"):
        assert (tmp_path / "node_c" / built.name / rel).read_bytes() == (built / rel).read_bytes()
    assert [p.name for p in (tmp_path / "node_c").iterdir()] == [built.name]  # no temp folder left
    assert local_index(str(built), rag, fetch) == (path, False) and calls == [1]  # the next actor reuses it
