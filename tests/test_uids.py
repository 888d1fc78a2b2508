import numpy as np
import pyarrow as pa
import pytest

from conceptprune import uids as U
from conceptprune.errors import PoolError


def test_codec_matches_divmod():
    u = "0123456789abcdef0011223344556677"
    hi, lo = U.uid_to_pair(u)
    assert (hi, lo) == divmod(int(u, 16), 1 << 64)
    assert U.pair_to_uid(hi, lo) == u


@pytest.mark.parametrize("u", ["00000000000000000000000000000001", "0000000000000000ffffffffffffffff",
                               "00000000000000010000000000000000", "ffffffffffffffffffffffffffffffff"])
def test_leading_zeros_round_trip(u):
    arr = U.uids_to_array([u])
    assert U.array_to_uids(arr) == [u]
    vec = U.arrow_uids_to_array(pa.array([u]))
    assert vec.tolist() == arr.tolist()


def test_short_uid_is_left_padded():
    assert U.uid_to_pair("1") == (0, 1)
    assert U.uid_to_pair("1" + "0" * 16) == (1, 0)
    arr = U.arrow_uids_to_array(pa.array(["1", "abc", "f" * 32]))
    assert U.array_to_uids(arr) == ["0" * 31 + "1", "0" * 29 + "abc", "f" * 32]


def test_uppercase_accepted_and_canonicalised():
    assert U.array_to_uids(U.arrow_uids_to_array(pa.array(["ABCDEF" + "0" * 26]))) == ["abcdef" + "0" * 26]


@pytest.mark.parametrize("bad", ["0x12", "12_34", " 12", "g" * 32, "1" * 33, "", "+1"])
def test_malformed_uids_rejected(bad):
    with pytest.raises(ValueError):
        U.uid_to_pair(bad)
    with pytest.raises(PoolError, match="row 1"):
        U.arrow_uids_to_array(pa.array(["a" * 32, bad, "b" * 32]), source="x.parquet")


def test_null_uid_rejected():
    with pytest.raises(PoolError, match="row 0: uid is null"):
        U.arrow_uids_to_array(pa.array([None, "a" * 32], pa.string()))


def test_vectorised_equals_scalar_on_random_uids():
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 2**64, 500, dtype=np.uint64)
    lo = rng.integers(0, 2**64, 500, dtype=np.uint64)
    hi[:20] >>= np.uint64(40)  # leading zeros
    hexes = [f"{int(h):016x}{int(l):016x}" for h, l in zip(hi, lo)]
    vec = U.arrow_uids_to_array(pa.array(hexes))
    assert vec.tolist() == [U.uid_to_pair(h) for h in hexes]
    assert U.array_to_uids(vec) == hexes
    back = U.arrow_from_array(vec).to_pylist()
    assert back == hexes


def test_sliced_arrow_array():
    hexes = [f"{i:032x}" for i in range(10)]
    arr = pa.array(hexes).slice(3, 4)
    assert U.array_to_uids(U.arrow_uids_to_array(arr)) == hexes[3:7]


def test_hash_depends_only_on_uid_and_seed():
    a = U.uids_to_array([f"{i:032x}" for i in range(100)])
    h1 = U.hash_uids(a, 1)
    assert np.array_equal(h1[::-1], U.hash_uids(a[::-1], 1))
    assert not np.array_equal(h1, U.hash_uids(a, 2))
    assert len(np.unique(h1)) == 100
