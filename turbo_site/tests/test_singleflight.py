"""turbo_site.core.singleflight: callers missing the same entry together share one load."""

import asyncio

import pytest

from turbo_site.core.singleflight import load_once


def test_sixteen_callers_share_one_load_and_the_next_miss_loads_again():
    loads = []

    async def load():
        loads.append(1)
        await asyncio.sleep(0.01)
        return {"rules": len(loads)}

    async def run():
        together = await asyncio.gather(*(load_once(("k", 1), load) for _ in range(16)))
        later = await load_once(("k", 1), load)
        other = await load_once(("k", 2), load)
        return together, later, other

    together, later, other = asyncio.run(run())
    assert together == [{"rules": 1}] * 16 and len({id(result) for result in together}) == 1
    assert later == {"rules": 2} and other == {"rules": 3}


def test_a_cancelled_caller_leaves_the_load_to_the_others_and_errors_reach_all():
    async def slow():
        await asyncio.sleep(0.02)
        return "loaded"

    async def failing():
        await asyncio.sleep(0.01)
        raise RuntimeError("database away")

    async def run():
        first = asyncio.ensure_future(load_once("slow", slow))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(load_once("slow", slow))
        await asyncio.sleep(0)
        first.cancel()
        results = await asyncio.gather(first, second, return_exceptions=True)
        failures = await asyncio.gather(*(load_once("failing", failing) for _ in range(3)), return_exceptions=True)
        return results, failures

    (first, second), failures = asyncio.run(run())
    assert isinstance(first, asyncio.CancelledError) and second == "loaded"
    assert [str(error) for error in failures] == ["database away"] * 3
    with pytest.raises(RuntimeError):  # nothing kept from the failed load: the next one runs (and fails) anew
        asyncio.run(load_once("failing", failing))
