"""The ray transport's pure parts: bucket planning and the checksum every bucket carries."""

import torch

from raylign.actors.weight_sync import checksum, plan_buckets


def test_buckets_keep_order_and_size_and_a_big_tensor_goes_alone():
    sizes = [("a", 40), ("b", 50), ("c", 20), ("d", 300), ("e", 10), ("f", 95)]
    assert plan_buckets(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    assert plan_buckets(sizes, 1000) == [["a", "b", "c", "d", "e", "f"]]
    assert plan_buckets([], 100) == []


def test_checksum_sees_a_flipped_byte_a_rename_a_reshape_and_a_dtype():
    torch.manual_seed(0)
    t = {"w": torch.randn(4, 6).to(torch.bfloat16), "b": torch.randn(6)}
    base = checksum(t)
    assert checksum({k: v.clone() for k, v in t.items()}) == base  # a function of the values only
    flipped = t["w"].clone()
    flipped.reshape(-1).view(torch.uint8)[5] ^= 1
    assert checksum({**t, "w": flipped}) != base
    assert checksum({"w2": t["w"], "b": t["b"]}) != base
    assert checksum({**t, "w": t["w"].reshape(6, 4)}) != base
    assert checksum({**t, "b": t["b"].double()}) != base
    assert checksum({"b": t["b"], "w": t["w"]}) != base  # order is part of it: the receiver loads in order
    assert checksum({"w": t["w"][:, :3]}) == checksum({"w": t["w"][:, :3].contiguous()})  # views are fine
