"""``tf.train.Example`` messages without TensorFlow, parsed by the ``protobuf`` library.

TensorFlow's ``example.proto`` / ``feature.proto`` define (field numbers are the wire format)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1; }  Int64List { repeated int64 value = 1; }

We build the same messages from a descriptor at import time, in a private descriptor pool (so
they cannot clash with a TensorFlow or TensorBoard copy loaded in the same process), and let
``protobuf`` (its upb C backend) do the parsing. Why not hand-decode the wire format: protobuf
is a well-kept dependency already installed with TensorBoard/W&B, handles every legal encoding
(packed and unpacked repeated fields, unknown fields, field order), and its parsing of a ClickMe
record is negligible next to decoding its JPEGs.
"""

from __future__ import annotations

from typing import Union

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

FeatureValue = Union[bytes, list[bytes], list[float], list[int]]


def _build_example_class() -> type[message.Message]:
    proto = descriptor_pb2.FileDescriptorProto(name="harmonia/tf_example.proto", package="tensorflow", syntax="proto3")
    field = descriptor_pb2.FieldDescriptorProto
    repeated, optional = field.LABEL_REPEATED, field.LABEL_OPTIONAL
    for name, kind in (("BytesList", field.TYPE_BYTES), ("FloatList", field.TYPE_FLOAT), ("Int64List", field.TYPE_INT64)):
        proto.message_type.add(name=name).field.add(name="value", number=1, type=kind, label=repeated)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, name, type_name in ((1, "bytes_list", "BytesList"), (2, "float_list", "FloatList"), (3, "int64_list", "Int64List")):
        feature.field.add(name=name, number=number, type=field.TYPE_MESSAGE, label=optional,
                          type_name=f".tensorflow.{type_name}", oneof_index=0)
    features = proto.message_type.add(name="Features")
    features.field.add(name="feature", number=1, type=field.TYPE_MESSAGE, label=repeated,
                       type_name=".tensorflow.Features.FeatureEntry")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=field.TYPE_MESSAGE, label=optional, type_name=".tensorflow.Feature")
    proto.message_type.add(name="Example").field.add(
        name="features", number=1, type=field.TYPE_MESSAGE, label=optional, type_name=".tensorflow.Features"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _build_example_class()


def encode_example(features: dict[str, FeatureValue]) -> bytes:
    """Serialize a ``tf.train.Example``: ``bytes`` → bytes_list, ints → int64_list, floats → float_list.

    A value may be a single ``bytes``/``int``/``float`` or a list of one kind.
    """
    example = Example()
    for key, value in features.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, bytes) for v in values):
            feature.bytes_list.value.extend(values)
        elif all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise TypeError(f"feature {key!r}: values must all be bytes, ints or floats; got {value!r:.80}")
    return example.SerializeToString()


def decode_example(data: bytes) -> dict[str, FeatureValue]:
    """Parse a serialized ``tf.train.Example`` into ``{key: list of values}``.

    Raises ``google.protobuf.message.DecodeError`` on bytes that are not an Example.
    """
    example = Example()
    example.ParseFromString(data)
    out: dict[str, FeatureValue] = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = list(getattr(feature, kind).value) if kind else []
    return out
