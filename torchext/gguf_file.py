"""GGUF files as torchext reads them: the header, key/value table and tensor table parsed and
checked here, each tensor's bytes read into a fresh tensor.

gguf.GGUFReader memory-maps the file and trusts its tables: a cut or corrupted file fails inside
numpy (IndexError, "cannot reshape array of size 0", ...), and a file cut after it was mapped
raises SIGBUS when a tensor's pages are touched. GGUFFile uses ordinary reads, so a short file is
a ValueError at whatever moment it turns short, naming the file and, where there is one, the tensor.
What no check sees: a file rewritten in place (same size or longer) between the reading of its
tables and of a tensor's data gives whatever bytes it then holds.

The layout (GGUF versions 2 and 3, little-endian):
  header       b"GGUF", u32 version, u64 tensor count, u64 key/value count
  key/values   string key, u32 value type, value; a string is a u64 length and UTF-8 bytes, an
               array a u32 element type, a u64 count and the elements
  tensor infos string name, u32 n_dims, u64 dims[n_dims] (ne0, the row length, first), u32 type,
               u64 offset into the data section
  data section from the end of the tensor infos rounded up to the alignment (the u32 key
               general.alignment, default 32): the tensors in table order, back to back, each
               padded to the alignment (llama.cpp refuses any other layout)

What the checks cannot catch: a tensor whose type or shape was changed to one of the same padded
byte size (Q4_0 <-> IQ4_NL, F16 <-> BF16 <-> I16, F32 <-> I32, swapped dims, or sizes that differ by
less than the padding absorbs), the last tensor's changed to a smaller one (bytes may follow the
last tensor: llama.cpp's loader never looks past the data it computes), and corrupted bytes inside a
tensor's data: its scales and codes are all valid bit patterns, so they load and compute whatever
they encode.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from typing import NamedTuple, NoReturn

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .weights import WEIGHT_IDS

INT64_MAX = 2**63 - 1  # ggml counts elements and bytes in int64
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# keys and tensor names are short (llama.cpp's tensor names under 64 bytes): a corrupted length is
# an error at once, not a read of gigabytes
MAX_NAME_BYTES = 1 << 16
# gguf's writer can nest arrays: a bound keeps the recursion shallow
MAX_ARRAY_NESTING = 8

_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
# struct formats of the integer value types (little-endian)
_INT_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
}
# the fewest bytes a value of each non-scalar type takes: a string's length, an array's type and count
_MIN_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


class GGUFKeyValue(NamedTuple):
    """One metadata entry as the table holds it: key, value type (a GGUFValueType id), length (an
    array's element count, else 0) and the entry's byte span [start, end) in the file, key included."""

    key: str
    value_type: int
    length: int
    start: int
    end: int


class GGUFTensor(NamedTuple):
    """One entry of a GGUF file's tensor table, checked against the file. The fields mirror
    gguf.ReaderTensor's (shape in ggml order, ne0 first; data_offset from the start of the file)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data_offset: int

    @property
    def k(self) -> int:
        """Values per row: ne0."""
        return self.shape[0]

    @property
    def n(self) -> int:
        """Rows: the product of the other dims."""
        return math.prod(self.shape[1:])

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The values' shape in numpy order (dims reversed): [n, k] for a matrix."""
        return self.shape[::-1]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The bytes' shape in numpy order, a row's bytes last (what gguf.quants.dequantize takes)."""
        return (*self.shape[:0:-1], self.n_bytes // self.n)


class GGUFFile:
    """An open GGUF file whose tables were read and checked on opening (ValueError naming the
    file, and the tensor where there is one, for anything malformed):

        with GGUFFile(path) as g:
            for t in g.tensors:
                raw = g.read(t)  # uint8 tensor of t.n_bytes

    Attributes: name (the path as given), size (bytes, when the tables were read), version,
    alignment, data_offset (where the data section starts), key_values (the metadata entries,
    GGUFKeyValue, in table order: spans, values not decoded) and tensors (in table order).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.name = os.fspath(path)
        # a FIFO would block the open until a writer came, and a pipe or device reads as a file of size 0
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a device or socket"
            raise ValueError(f"{self.name}: expected a GGUF file, got {kind}")
        self._f = open(path, "rb")
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            tables = _TableReader(self._f, self.name, self.size)
            self.version, self.alignment, self.data_offset, self.key_values, self.tensors = tables.read()
            self._check_data_layout()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (leaving a `with` block does)."""
        self._f.close()

    @property
    def data_bytes(self) -> int:
        """Bytes of the data section (0 for a file with no tensors that ends before it)."""
        return max(self.size - self.data_offset, 0)

    def entry_bytes(self, kv: GGUFKeyValue) -> bytes:
        """A metadata entry's bytes as stored (key, type and value)."""
        self._f.seek(kv.start)
        raw = self._f.read(kv.end - kv.start)
        if len(raw) != kv.end - kv.start:
            raise ValueError(f"{self.name}: key {kv.key!r}: the file shrank after its tables were read")
        return raw

    def string_value(self, key: str) -> str | None:
        """The value of a STRING metadata entry (None when there is no such entry); a value that is not UTF-8
        is a ValueError naming the file and key (reading the tables skips the values undecoded)."""
        for kv in self.key_values:
            if kv.key == key and kv.value_type == GGUFValueType.STRING:
                raw = self.entry_bytes(kv)[8 + len(key.encode("utf-8")) + 4 + 8:]  # past key, type, length
                try:
                    return raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{self.name}: key {key!r}: its string value is not UTF-8 ({e.reason} at its byte "
                                     f"{e.start})") from None
        return None

    def int_value(self, key: str) -> int | None:
        """The value of an integer metadata entry (None when there is no such entry, or it holds no integer)."""
        for kv in self.key_values:
            if kv.key == key and kv.value_type in _INT_FORMATS:
                fmt = _INT_FORMATS[kv.value_type]
                return struct.unpack_from(fmt, self.entry_bytes(kv), 8 + len(key.encode("utf-8")) + 4)[0]
        return None

    def read(self, t: GGUFTensor) -> torch.Tensor:
        """A tensor's bytes, a fresh uint8 tensor (64-byte aligned, as every torch allocation)."""
        return self._read(t.data_offset, t.n_bytes, f"tensor {t.name!r}")

    def read_data_section(self, pin_memory: bool = False) -> torch.Tensor:
        """The whole data section as one uint8 tensor."""
        return self._read(self.data_offset, self.data_bytes, "the data section", pin_memory)

    def check_reader(self, reader) -> None:
        """ValueError unless a gguf.GGUFReader's tensor table is this file's (TypeError for anything but a
        GGUFReader). Reads only the reader's Python fields, never its memory map (whose pages may be gone)."""
        if not isinstance(reader, GGUFReader):
            raise TypeError(f"reader: expected a gguf.GGUFReader, got {type(reader).__name__}")
        theirs = [(t.name, int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]
        ours = [(t.name, int(t.tensor_type), t.data_offset) for t in self.tensors]
        if theirs != ours:
            raise ValueError(f"{self.name}: reader: its tensor table is not the file's as read now "
                             "(was the file rewritten after the reader opened it?)")

    def _read(self, start: int, n_bytes: int, what: str, pin_memory: bool = False) -> torch.Tensor:
        out = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        self._f.seek(start)
        got = self._f.readinto(out.numpy())  # BufferedReader.readinto reads until full or end of file
        if got != n_bytes:  # the file shrank after its tables were read
            now = os.fstat(self._f.fileno()).st_size
            raise ValueError(f"{self.name}: {what}: data [{start}, {start + n_bytes}) runs past the end of the "
                             f"file (size {now}; it was {self.size} when its tables were read)")
        return out

    def _check_data_layout(self) -> None:
        """Every tensor within the file and aligned, then the tensors back to back: each one's
        (type, shape) byte size, padded, is the distance to the next one's data."""
        for t in self.tensors:
            offset = t.data_offset - self.data_offset
            if offset % self.alignment:
                raise ValueError(f"{self.name}: tensor {t.name!r}: data offset {offset} is not a multiple of the "
                                 f"file's alignment {self.alignment}")
            end = t.data_offset + t.n_bytes
            if end > self.size:
                raise ValueError(f"{self.name}: tensor {t.name!r}: data [{t.data_offset}, {end}) runs past the "
                                 f"end of the file (size {self.size})")
        if self.tensors and self.tensors[0].data_offset != self.data_offset:
            t = self.tensors[0]
            raise ValueError(f"{self.name}: tensor {t.name!r}: data offset {t.data_offset - self.data_offset}, but "
                             "the first tensor's data starts the data section (offset 0)")
        for i, t in enumerate(self.tensors):
            padded = _round_up(t.n_bytes, self.alignment)
            if i + 1 < len(self.tensors):
                nxt = self.tensors[i + 1]
                span = nxt.data_offset - t.data_offset
                fits = span == padded
                holds = f"the next tensor, {nxt.name!r}, starts {span} bytes after its start"
            else:  # a writer may leave out the last tensor's padding, or add bytes after it
                # (llama.cpp's loader reads the data section's computed size and never looks past it)
                span = self.size - t.data_offset
                fits = t.n_bytes <= span
                holds = f"the file holds {span} bytes from its start to the end"
            if not fits:
                raise ValueError(f"{self.name}: tensor {t.name!r}: {t.tensor_type.name} of shape {list(t.shape)} "
                                 f"takes {t.n_bytes} bytes ({padded} padded to the alignment {self.alignment}), "
                                 f"but {holds}: the table's type or shape does not match the file's data")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _TableReader:
    """Reads the header and tables through a window of the file (ordinary reads, bounded memory).
    `context` names what is being read for the error messages."""

    _WINDOW = 1 << 20

    def __init__(self, f, name: str, size: int) -> None:
        self.f, self.name, self.size = f, name, size
        self.pos = 0  # the next byte to read, from the start of the file
        self.window = b""
        self.window_start = 0
        self.context = "the header"

    def fail(self, message: str) -> NoReturn:
        raise ValueError(f"{self.name}: {self.context}: {message}")

    def skip(self, n: int, part: str) -> None:
        end = self.pos + n
        if end > self.size:
            self.fail(f"{part} [{self.pos}, {end}) runs past the end of the file (size {self.size})")
        self.pos = end

    def take(self, n: int, part: str) -> int:
        """Index in self.window of the next n bytes, which are then read."""
        start = self.pos
        self.skip(n, part)
        if self.pos > self.window_start + len(self.window):
            self.f.seek(start)
            self.window = self.f.read(max(n, self._WINDOW))
            self.window_start = start
            if len(self.window) < n:
                self.fail(f"{part} [{start}, {self.pos}): the file shrank while its tables were read")
        return start - self.window_start

    def u32(self, part: str) -> int:
        i = self.take(4, part)  # first: it may replace the window
        return struct.unpack_from("<I", self.window, i)[0]

    def u64(self, part: str) -> int:
        i = self.take(8, part)  # first: it may replace the window
        return struct.unpack_from("<Q", self.window, i)[0]

    def read_name(self, part: str) -> str:
        """A key or tensor name: a string of at most MAX_NAME_BYTES."""
        n = self.u64(f"{part}'s length")
        if n > MAX_NAME_BYTES:
            self.fail(f"{part} of {n} bytes; torchext reads names of up to {MAX_NAME_BYTES}")
        i = self.take(n, part)
        try:
            return self.window[i:i + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{part} is not UTF-8")

    def read(self) -> tuple[int, int, int, tuple[GGUFKeyValue, ...], tuple[GGUFTensor, ...]]:
        """(version, alignment, data section offset, metadata entries, tensors) of the file."""
        i = self.take(4, "magic")
        magic = self.window[i:i + 4]
        if magic != b"GGUF":
            self.fail(f"not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
                self.fail("a big-endian GGUF file; torchext reads little-endian ones")
            self.fail(f"GGUF version {version} is not supported (torchext reads versions "
                      f"{' and '.join(map(str, SUPPORTED_VERSIONS))})")
        tensor_count = self.u64("tensor count")
        kv_count = self.u64("key/value count")
        if tensor_count * _MIN_TENSOR_INFO_BYTES + kv_count * _MIN_KV_BYTES > self.size - self.pos:
            self.fail(f"{tensor_count} tensors and {kv_count} key/value pairs cannot fit in a file of "
                      f"{self.size} bytes")
        alignment, key_values = self._read_key_values(kv_count)
        infos = self._read_tensor_infos(tensor_count)
        data_offset = _round_up(self.pos, alignment)  # the data section follows the table
        tensors = tuple(GGUFTensor(name, tensor_type, shape, n_bytes, data_offset + offset)
                        for name, tensor_type, shape, n_bytes, offset in infos)
        return version, alignment, data_offset, key_values, tensors

    def _read_key_values(self, count: int) -> tuple[int, tuple[GGUFKeyValue, ...]]:
        """Check the key/value table; return general.alignment (or the default) and the entries."""
        alignment = DEFAULT_ALIGNMENT
        keys, entries = set(), []
        for i in range(count):
            self.context = f"key/value pair {i}"
            start = self.pos
            key = self.read_name("key")
            self.context = f"key {key!r}"
            if key in keys:
                self.fail("appears twice")
            keys.add(key)
            vtype = self.u32("value type")
            if key == "general.alignment":
                if vtype != GGUFValueType.UINT32:
                    self.fail(f"value type {vtype}, expected UINT32 ({GGUFValueType.UINT32.value})")
                alignment = self.u32("value")
                if alignment == 0 or alignment & (alignment - 1):
                    self.fail(f"{alignment} is not a power of two")
                length = 0
            else:
                length = self._skip_value(vtype, 0)
            entries.append(GGUFKeyValue(key, vtype, length, start, self.pos))
        return alignment, tuple(entries)

    def _skip_value(self, vtype: int, depth: int) -> int:
        """Skip a value of type vtype; return its element count if it is an array, else 0."""
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype], "value")
        elif vtype == GGUFValueType.STRING:
            self.skip(self.u64("string length"), "string")
        elif vtype == GGUFValueType.ARRAY:
            if depth == MAX_ARRAY_NESTING:
                self.fail(f"arrays nested more than {MAX_ARRAY_NESTING} deep")
            etype = self.u32("array element type")
            count = self.u64("array length")
            if etype in _SCALAR_BYTES:
                self.skip(count * _SCALAR_BYTES[etype], f"array of {count} elements")
            elif etype in _MIN_BYTES:
                if count * _MIN_BYTES[etype] > self.size - self.pos:
                    self.fail(f"an array of {count} elements cannot fit in a file of {self.size} bytes")
                for _ in range(count):
                    self._skip_value(etype, depth + 1)
            else:
                self.fail(f"unknown array element type {etype}")
            return count
        else:
            self.fail(f"unknown value type {vtype}")
        return 0

    def _read_tensor_infos(self, count: int) -> list[tuple]:
        """(name, type, shape, bytes, offset in the data section) of each tensor."""
        infos, names = [], set()
        for i in range(count):
            self.context = f"tensor info {i}"
            name = self.read_name("name")
            self.context = f"tensor {name!r}"
            if name in names:
                self.fail("appears twice in the tensor table")
            names.add(name)
            n_dims = self.u32("n_dims")
            if n_dims > MAX_DIMS:
                self.fail(f"{n_dims} dimensions; a GGUF tensor has at most {MAX_DIMS}")
            # a 0-dimensional tensor (GGUFWriter writes a numpy scalar so) is one value: ggml's missing dims are 1
            shape = tuple(self.u64(f"dimension {j}") for j in range(n_dims)) or (1,)
            tensor_type = self._tensor_type(self.u32("type"))
            n_bytes = self._tensor_bytes(tensor_type, shape)
            infos.append((name, tensor_type, shape, n_bytes, self.u64("data offset")))
        return infos

    def _tensor_type(self, type_id: int) -> GGMLQuantizationType:
        try:
            return GGMLQuantizationType(type_id)
        except ValueError:
            self.fail(f"unknown tensor type id {type_id}")

    def _tensor_bytes(self, tensor_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
        """Bytes of a (type, shape): whole blocks per row; elements and bytes within int64."""
        if 0 in shape:
            self.fail(f"shape {list(shape)} holds no values (an empty tensor)")
        block_values, block_bytes = GGML_QUANT_SIZES[tensor_type]
        if shape[0] % block_values:
            self.fail(f"{tensor_type.name} rows are whole blocks of {block_values} values, but ne0 is {shape[0]}")
        elements = math.prod(shape)
        n_bytes = elements // block_values * block_bytes
        if max(elements, n_bytes) > INT64_MAX:
            self.fail(f"{tensor_type.name} of shape {list(shape)} is {n_bytes} bytes, more than int64 holds")
        return n_bytes


def ggml_k_n(t) -> tuple[int, int]:
    """(k, n) of a GGUFReader tensor: k = ne0 (the row length, first in ggml's dims), n the rest."""
    dims = [int(d) for d in t.shape]
    return dims[0], math.prod(dims[1:])


#: The tensor types kept as they are stored, viewed as a torch dtype (little-endian, as torch on every
#: host it runs on)
VIEW_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


def tensor_from_bytes(raw: torch.Tensor, t: GGUFTensor, file: str, device: torch.device) -> torch.Tensor:
    """A GGUF tensor on `device` from its bytes (a uint8 CPU tensor): the bytes themselves for a
    weight format, a typed view for the VIEW_DTYPES types, else gguf's float32 dequantization."""
    from gguf.quants import dequantize as gguf_dequantize

    if t.tensor_type.value in WEIGHT_IDS:
        return raw.to(device)
    if t.tensor_type.name in VIEW_DTYPES:
        return raw.view(VIEW_DTYPES[t.tensor_type.name]).view(t.numpy_shape).to(device)
    try:
        values = gguf_dequantize(raw.numpy().reshape(t.byte_shape), t.tensor_type)  # float32
    except NotImplementedError:
        raise ValueError(f"{file}: tensor {t.name!r}: gguf cannot dequantize tensor type {t.tensor_type.name}; "
                         "WeightCache.load_gguf(names=..., pool=False) can leave it out") from None
    return torch.from_numpy(values).to(device)
