"""erase_lab/benchmarks_md.py: benchmark rows and BENCHMARKS.md sections written by modules that may run side by side."""

import json
import re

from erase_lab.benchmarks_md import BENCHMARKS, HEADER, SECTIONS, RowStore, section_body, update_section, wrapped


def test_two_runs_of_one_benchmark_keep_each_others_rows(tmp_path):
    """Two runs load the same store, then each lands a row: the file holds both (a run re-measuring a row replaces
    only that row), and a row of another model stays until measured again."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"method": "esd", "size": 10, "model": "old"}]))
    first, second = RowStore(path, ("method", "size"), "new"), RowStore(path, ("method", "size"), "new")
    first.put({"method": "fia", "size": 1, "forget": 0.1})
    second.put({"method": "esd", "size": 1, "forget": 0.2})
    first.put({"method": "fia", "size": 1, "forget": 0.0})
    rows = json.loads(path.read_text())
    assert sorted((r["method"], r["size"], r.get("forget"), r["model"]) for r in rows) == [
        ("esd", 1, 0.2, "new"), ("esd", 10, None, "old"), ("fia", 1, 0.0, "new")]
    assert RowStore(path, ("method", "size"), "new").has(method="esd", size=1)
    assert not RowStore(path, ("method", "size"), "new").has(method="esd", size=10)


def test_a_print_only_store_holds_only_what_it_measured():
    """A --no-record run's table must show the rows it measured (at its own seeds), not the recorded ones."""
    store = RowStore(None, ("method", "size"), "m")
    store.put({"method": "fia", "size": 1, "forget": 0.1})
    store.put({"method": "fia", "size": 1, "forget": 0.0})
    assert store.rows == [{"method": "fia", "size": 1, "forget": 0.0, "model": "m"}]
    assert store.has(method="fia", size=1) and not store.has(method="esd", size=1)
    assert store.stale_note("rerun") == []


def test_a_row_sampled_at_another_guidance_counts_as_missing_and_is_marked(tmp_path):
    """Changing the mini world's guidance changes every number: rows measured at the old one (or before rows were
    stamped with it) must be measured again, not shown as current."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"method": "fia", "size": 1, "model": "m"},
                                {"method": "esd", "size": 1, "model": "m", "guidance": 4.0}]))
    store = RowStore(path, ("method", "size"), "m", guidance=2.0)
    assert not store.has(method="fia", size=1) and not store.has(method="esd", size=1)
    assert [store.mark(r) for r in store.rows] == [" †", " †"]
    assert "at guidance 2" in store.stale_note("rerun")[0]
    store.put({"method": "fia", "size": 1, "forget": 0.1})
    assert RowStore(path, ("method", "size"), "m", guidance=2.0).get(method="fia", size=1)["forget"] == 0.1
    assert not RowStore(path, ("method", "size"), "m", guidance=4.0).has(method="fia", size=1)


def test_sections_written_one_after_another_are_both_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    update_section("A", "table a\n", path)
    update_section("B", "table b\n", path)
    update_section("A", "table a, again\n", path)
    text = path.read_text()
    assert "table a, again" in text and "table b" in text and "table a\n" not in text


def test_a_new_file_starts_with_the_header(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    update_section("A", "table a\n", path)
    assert path.read_text() == f"{HEADER}\n## A\n\ntable a\n"


def test_benchmarks_md_has_the_sections_its_header_lists_and_no_long_prose():
    """The header lists every section, in the file's order; prose is wrapped (only table rows may be long)."""
    text = BENCHMARKS.read_text()
    assert text.startswith(HEADER)
    assert re.findall(r"^## (.*)$", text, re.MULTILINE) == list(SECTIONS)
    long = [line[:60] for line in text.splitlines() if len(line) > 400 and not line.startswith("|")]
    assert long == []


def test_a_section_is_its_tables_then_one_wrapped_paragraph_then_its_command():
    body = section_body(["| a |\n|---|\n| 1 |"], "word " * 60 + "- x", "`python -m erase_lab.x`", ["_stale._"])
    status, table, protocol, reproduce = body.split("\n\n")
    assert (status, table) == ("_stale._", "| a |\n|---|\n| 1 |") and reproduce == "Reproduce: `python -m erase_lab.x`"
    assert max(map(len, protocol.splitlines())) <= 120 and protocol.split() == ["word"] * 60 + ["-", "x"]


def test_wrapping_never_starts_a_line_with_a_markdown_marker():
    lines = wrapped("loss(reference) - loss(concept) + 1. # > * " * 40, width=30).splitlines()
    assert len(lines) > 10 and not any(re.match(r"([-+*>#]|\d+[.)])( |$)", line) for line in lines)


def test_a_new_section_goes_where_the_index_lists_it_and_the_index_names_it(tmp_path):
    """Sections are listed in SECTIONS order: a benchmark run for the first time does not append its section at the end
    of the file, and the index at the top gains its line."""
    first, new, last = list(SECTIONS)[0], list(SECTIONS)[1], list(SECTIONS)[-1]
    path = tmp_path / "BENCHMARKS.md"
    old_header = HEADER.replace(f"- [{new}]", "- [gone]")
    path.write_text(f"{old_header}\n## {first}\n\nfirst\n\n## {last}\n\nlast\n")
    update_section(new, "new", path)
    text = path.read_text()
    assert text.startswith(HEADER)
    assert text.index(f"## {first}") < text.index(f"## {new}\n\nnew\n") < text.index(f"## {last}")
