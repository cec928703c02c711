"""Stop sequences over streamed deltas: cut at the first, never stream part of one."""

from __future__ import annotations

from bot.api.stop import StopText


def run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    stop = StopText(stops)
    out = [stop.push(delta) for delta in deltas]
    out.append(stop.finish())
    return out, stop.stopped


def test_a_stop_split_across_deltas_is_held_back_and_cut() -> None:
    out, stopped = run(["END"], ["hello E", "N", "D and more", " never"])
    assert out == ["hello ", "", "", "", ""] and stopped


def test_a_false_start_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    out, stopped = run(["END"], ["abc E", "Nx", " tail"])
    assert "".join(out) == "abc ENx tail" and out[0] == "abc " and not stopped


def test_the_earliest_of_several_stops_wins_and_no_stops_pass_everything() -> None:
    out, stopped = run(["b", "zz"], ["aaa zz b"])
    assert "".join(out) == "aaa " and stopped
    out, stopped = run([], ["a", "b"])
    assert out == ["a", "b", ""] and not stopped
