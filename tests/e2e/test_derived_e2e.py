"""Derived items through the session daemon: a Write of structured memory names its source turns, Read
returns them, and a Purge of a turn takes the items derived from it, its receipt naming them."""

from __future__ import annotations

import pytest
from memosd_client import Client
from memosd_client.errors import InvalidField, ItemNotFound


def test_structured_memory_names_its_turns_and_purging_a_turn_cascades(client: Client, cube_name: str) -> None:
    client.alloc_cube(cube_name)
    with client.mount(cube_name, writable=True) as m:
        turns = list(client.ingest(m, [{"speaker": "Caroline", "text": "I adopted a dog last week"},
                                       {"speaker": "Melanie", "text": "I love pottery"}], session_id="s1").item_ids)
        [fact, kept] = m.write([{"text": "Caroline adopted a dog.", "derived_from": [turns[0]]},
                                {"text": "Melanie loves pottery.", "derived_from": [turns[1]]}])
        with pytest.raises(ItemNotFound):
            m.write([{"text": "Caroline has a cat.", "derived_from": ["itm_aaaaaaaaaaaaaaaaaaaa"]}])
        with pytest.raises(InvalidField):
            m.write([{"text": "Caroline has a cat.", "derived_from": ["not-an-id"]}])
        m.commit("structured memory")
        [item] = m.read([fact])
        assert list(item.derived_from) == [turns[0]] and item.derived_job == ""
    receipt = client.purge(cube_name, [turns[0]])
    assert sorted(receipt.item_ids) == sorted([turns[0], fact]) and list(receipt.derived_item_ids) == [fact]
    with client.mount(cube_name) as ro:
        assert sorted(i.item_id for i in ro.iter_items()) == sorted([turns[1], kept])
