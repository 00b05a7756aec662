"""Declared lengths of a DICOM file's data elements, checked before GDCM reads the file.

GDCM allocates an element's value at the length its header declares before it
finds that the file ends first: one mutated length of a few megabytes in a 1 KB
slice made ``ReadImageInformation`` peak at 1.5 GB, and a 32-bit length can
ask for 4 GB. :func:`length_problem` walks the data elements without decoding a
value (the file meta group, then the data set in its transfer syntax, into
sequences and items and the fragments of encapsulated pixel data, and on past
the pixel data to the end of the file, as GDCM does) and reports the first
length that runs past the end of the file. An element whose VR is not a VR is
read as implicit VR (a 4-byte length), as GDCM falls back to.

It only refuses what is certainly wrong. Whatever it cannot follow (no
preamble, a deflated data set, a delimiter out of place, too deep a nesting,
too many elements) ends the walk with "no problem found" and GDCM decides, as
it did before. Reads are bounded: the first
:data:`HEAD_BYTES` of the file, then a few bytes per element header beyond
them; nothing is ever allocated from a declared length.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

#: Read at once from the start of the file: the whole header of nearly every slice.
HEAD_BYTES = 64 * 2**10
#: Sequences inside items inside sequences... deeper than this is left to GDCM.
MAX_DEPTH = 16
#: Elements walked at most (headers, items, fragments), so a hostile file stays fast.
MAX_ELEMENTS = 100_000

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_ITEM_BYTES_LE = b"\xfe\xff\x00\xe0"  # (FFFE,E000) in little endian

# Explicit VR: these have 2 reserved bytes and a 4-byte length, the others a 2-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_VRS = _SHORT_VRS | _LONG_VRS

_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_TAG = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}


class _Damaged(Exception):
    """A declared length runs past the end of the file."""


class _Stop(Exception):
    """The walk can follow the file no further: leave it to GDCM."""


def length_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is damaged (a data element's declared length runs past the end of the
    file), or None when no such length was found or the file could not be followed."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            _Walk(file, size).file()
    except _Damaged as damage:
        return str(damage)
    except (_Stop, OSError):
        pass
    return None


def element_lengths_fit(path: str | os.PathLike[str]) -> bool:
    """True unless a data element's declared length runs past the end of ``path``."""
    return length_problem(path) is None


class _Walk:
    def __init__(self, file: BinaryIO, size: int) -> None:
        self.stream = file
        self.size = size
        self.head = file.read(min(size, HEAD_BYTES))
        self.elements_left = MAX_ELEMENTS
        self.name = Path(getattr(file, "name", "file")).name

    # -------------------------------------------------------------- bytes
    def bytes_at(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos``; a header cut off by the end of the file stops the walk."""
        end = pos + n
        if end > self.size:
            raise _Stop
        if end <= len(self.head):
            return self.head[pos:end]
        self.stream.seek(pos)
        data = self.stream.read(n)
        if len(data) < n:  # the file shrank while we read it
            raise _Stop
        return data

    def header(self, pos: int, explicit: bool, little: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, where the value starts) of the element at ``pos``."""
        self.elements_left -= 1
        if self.elements_left < 0:
            raise _Stop
        raw = self.bytes_at(pos, 8)
        group, element = _TAG[little].unpack_from(raw)
        tag = group << 16 | element
        if group == 0xFFFE or not explicit:  # items and delimiters never have a VR
            return tag, None, _U32[little].unpack_from(raw, 4)[0], pos + 8
        vr = raw[4:6]
        if vr in _SHORT_VRS:
            return tag, vr, _U16[little].unpack_from(raw, 6)[0], pos + 8
        if vr in _LONG_VRS:
            return tag, vr, _U32[little].unpack_from(self.bytes_at(pos + 8, 4))[0], pos + 12
        # Not a VR: GDCM then reads the element as implicit VR (4-byte length), and so do we.
        return tag, None, _U32[little].unpack_from(raw, 4)[0], pos + 8

    def fits(self, tag: int, value: int, length: int) -> None:
        if value + length > self.size:
            raise _Damaged(
                f"{self.name}: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares "
                f"{length} bytes at byte {value}, past the end of the {self.size}-byte file"
            )

    # -------------------------------------------------------------- structure
    def file(self) -> None:
        if self.size < 132 or self.head[128:132] != b"DICM":
            raise _Stop  # no preamble: not ours to judge
        pos, syntax = self.meta(132)
        if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            raise _Stop
        explicit = syntax != IMPLICIT_VR_LITTLE_ENDIAN
        little = syntax != EXPLICIT_VR_BIG_ENDIAN
        if pos + 6 <= self.size:  # GDCM goes by the data when it contradicts the syntax
            vr = self.bytes_at(pos + 4, 2)
            if not explicit and vr in _VRS:
                raise _Stop  # explicit VR under an implicit syntax (or a length that looks so)
            if explicit and little and vr not in _VRS:
                explicit = False  # implicit VR under an explicit syntax
        # To the end of the file, past the pixel data too: GDCM reads what follows it, and a
        # length there (trailing garbage) is allocated just the same.
        self.elements(pos, self.size, explicit, little, 0)

    def meta(self, pos: int) -> tuple[int, str]:
        """Walk group 0002 (always explicit VR little endian): (its end, transfer syntax)."""
        syntax = ""
        while pos + 8 <= self.size and _U16[True].unpack_from(self.bytes_at(pos, 2))[0] == 2:
            tag, _vr, length, value = self.header(pos, True, True)
            if length == UNDEFINED_LENGTH:
                raise _Stop
            self.fits(tag, value, length)
            if tag == 0x00020010:
                raw = self.bytes_at(value, min(length, 64))
                syntax = raw.decode("ascii", "replace").strip("\x00 ")
            pos = value + length
        return pos, syntax

    def elements(self, pos: int, end: int | None, explicit: bool, little: bool, depth: int) -> int:
        """Walk data elements from ``pos`` to ``end`` (None: up to an item delimiter).
        Returns the position after them (after the delimiter)."""
        while end is None or pos < end:
            tag, vr, length, value = self.header(pos, explicit, little)
            if tag == _ITEM_END and end is None:
                return value
            if tag >> 16 == 0xFFFE:
                raise _Stop  # an item or delimiter where an element belongs
            if length == UNDEFINED_LENGTH:
                if tag == _PIXEL_DATA:  # encapsulated: fragments up to a sequence delimiter
                    pos = self.fragments(value, little)
                    continue
                if vr not in (None, b"SQ", b"UN"):
                    raise _Stop
                # UN of undefined length holds a sequence in implicit VR little endian.
                sub_explicit, sub_little = (False, True) if vr == b"UN" else (explicit, little)
                pos = self.sequence(value, None, sub_explicit, sub_little, depth + 1)
                continue
            self.fits(tag, value, length)
            if vr == b"SQ":
                self.sequence(value, value + length, explicit, little, depth + 1)
            elif vr in (None, b"UN") and length >= 8 and self.bytes_at(value, 4) == _ITEM_BYTES_LE:
                # Implicit VR or UN: a value that starts with an item tag is a sequence.
                self.sequence(value, value + length, False, True, depth + 1)
            pos = value + length
        return pos

    def sequence(self, pos: int, end: int | None, explicit: bool, little: bool, depth: int) -> int:
        """Walk the items of a sequence from ``pos`` to ``end`` (None: up to a sequence
        delimiter). Returns the position after them."""
        if depth > MAX_DEPTH:
            raise _Stop
        while end is None or pos < end:
            tag, _vr, length, value = self.header(pos, False, little)
            if tag == _SEQUENCE_END:
                return value
            if tag != _ITEM:
                raise _Stop
            if length == UNDEFINED_LENGTH:
                pos = self.elements(value, None, explicit, little, depth)
            else:
                self.fits(tag, value, length)
                self.elements(value, value + length, explicit, little, depth)
                pos = value + length
        return pos

    def fragments(self, pos: int, little: bool) -> int:
        """Walk the items of encapsulated pixel data; returns the position after them."""
        while True:
            tag, _vr, length, value = self.header(pos, False, little)
            if tag == _SEQUENCE_END:
                return value
            if tag != _ITEM or length == UNDEFINED_LENGTH:
                raise _Stop
            self.fits(tag, value, length)
            pos = value + length
