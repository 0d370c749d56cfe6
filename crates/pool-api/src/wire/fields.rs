//! The field numbers of `agent.proto` that the fast paths write and read by hand, one constant
//! per field, grouped by message (and the `HeaderOp.Kind` values they map). The test at the end
//! of this file compiles `pool-api/proto/agentpool/v1/agent.proto` and checks every constant
//! against the compiled descriptor, by message and field name, together with the wire type the
//! fast paths use for it: renumbering a field in the schema, or changing its type, fails that
//! test instead of silently corrupting frames. A constant added here belongs in that test too.

/// `ProxyFrame`.
pub(super) mod proxy_frame {
    pub(crate) const STREAM_ID: u32 = 1;
    pub(crate) const EVENT: u32 = 3;
}

/// `AgentFrame`.
pub(super) mod agent_frame {
    pub(crate) const STREAM_ID: u32 = 1;
    pub(crate) const DECISION: u32 = 4;
}

/// `Event` (its `kind` oneof).
pub(super) mod event {
    pub(crate) const REQUEST_HEADERS: u32 = 1;
    pub(crate) const RESPONSE_HEADERS: u32 = 3;
}

/// `Header`.
pub(super) mod header {
    pub(crate) const NAME: u32 = 1;
    pub(crate) const VALUE: u32 = 2;
}

/// `KeyValue`.
pub(super) mod key_value {
    pub(crate) const KEY: u32 = 1;
    pub(crate) const VALUE: u32 = 2;
}

/// `RequestHeaders`.
pub(super) mod request_headers {
    pub(crate) const CORRELATION_ID: u32 = 1;
    pub(crate) const METHOD: u32 = 2;
    pub(crate) const URI: u32 = 3;
    pub(crate) const HEADERS: u32 = 4;
    pub(crate) const CLIENT_ADDR: u32 = 5;
    pub(crate) const METADATA: u32 = 6;
}

/// `ResponseHeaders`.
pub(super) mod response_headers {
    pub(crate) const CORRELATION_ID: u32 = 1;
    pub(crate) const STATUS: u32 = 2;
    pub(crate) const HEADERS: u32 = 3;
}

/// `Decision` (`allow` to `challenge` are its `action` oneof).
pub(super) mod decision {
    pub(crate) const ALLOW: u32 = 1;
    pub(crate) const BLOCK: u32 = 2;
    pub(crate) const REDIRECT: u32 = 3;
    pub(crate) const CHALLENGE: u32 = 4;
    pub(crate) const REQUEST_HEADERS: u32 = 5;
    pub(crate) const RESPONSE_HEADERS: u32 = 6;
    pub(crate) const BODY: u32 = 7;
    pub(crate) const NEEDS_MORE: u32 = 8;
    pub(crate) const AUDIT: u32 = 9;
}

/// `Block`.
pub(super) mod block {
    pub(crate) const STATUS: u32 = 1;
    pub(crate) const HEADERS: u32 = 2;
    pub(crate) const BODY: u32 = 3;
}

/// `Redirect`.
pub(super) mod redirect {
    pub(crate) const LOCATION: u32 = 1;
    pub(crate) const STATUS: u32 = 2;
}

/// `Challenge`.
pub(super) mod challenge {
    pub(crate) const KIND: u32 = 1;
    pub(crate) const PARAMS: u32 = 2;
}

/// `HeaderOp`, and the values of its `Kind` enum.
pub(super) mod header_op {
    pub(crate) const KIND: u32 = 1;
    pub(crate) const NAME: u32 = 2;
    pub(crate) const VALUE: u32 = 3;

    pub(crate) const KIND_SET: u64 = 0;
    pub(crate) const KIND_ADD: u64 = 1;
    pub(crate) const KIND_REMOVE: u64 = 2;
}

/// `BodyMutation` (`replace` and `drop` are its `change` oneof).
pub(super) mod body_mutation {
    pub(crate) const CHUNK_INDEX: u32 = 1;
    pub(crate) const REPLACE: u32 = 2;
    pub(crate) const DROP: u32 = 3;
}

/// `Audit`.
pub(super) mod audit {
    pub(crate) const RULE_IDS: u32 = 1;
    pub(crate) const TAGS: u32 = 2;
    pub(crate) const REASON: u32 = 3;
    pub(crate) const CONFIDENCE: u32 = 4;
    pub(crate) const CUSTOM: u32 = 5;
}

#[cfg(test)]
mod tests {
    use prost::encoding::WireType;
    use prost_types::field_descriptor_proto::Type;
    use prost_types::{DescriptorProto, FileDescriptorSet};

    use super::*;

    const SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/agentpool/v1/agent.proto");
    const INCLUDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");

    fn schema() -> FileDescriptorSet {
        protox::compile([SCHEMA], [INCLUDE]).unwrap_or_else(|e| panic!("cannot compile {SCHEMA}: {e}"))
    }

    fn message<'a>(schema: &'a FileDescriptorSet, name: &str) -> &'a DescriptorProto {
        let file = schema.file.iter().find(|f| f.package() == "agentpool.v1").expect("the agentpool.v1 file");
        file.message_type
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("agent.proto has no message {name}"))
    }

    /// The wire type a field of this type is encoded with (packed repeated scalars aside,
    /// which the fast paths do not write).
    fn wire_type(ty: Type) -> WireType {
        match ty {
            Type::String | Type::Bytes | Type::Message => WireType::LengthDelimited,
            Type::Float | Type::Fixed32 | Type::Sfixed32 => WireType::ThirtyTwoBit,
            Type::Double | Type::Fixed64 | Type::Sfixed64 => WireType::SixtyFourBit,
            Type::Group => WireType::StartGroup,
            _ => WireType::Varint,
        }
    }

    use WireType::{LengthDelimited as Ld, ThirtyTwoBit as Fixed32, Varint};

    /// Every constant of this file: message, field name, the constant, and the wire type the
    /// fast paths write and expect for it.
    const FIELDS: &[(&str, &str, u32, WireType)] = &[
        ("ProxyFrame", "stream_id", proxy_frame::STREAM_ID, Varint),
        ("ProxyFrame", "event", proxy_frame::EVENT, Ld),
        ("AgentFrame", "stream_id", agent_frame::STREAM_ID, Varint),
        ("AgentFrame", "decision", agent_frame::DECISION, Ld),
        ("Event", "request_headers", event::REQUEST_HEADERS, Ld),
        ("Event", "response_headers", event::RESPONSE_HEADERS, Ld),
        ("Header", "name", header::NAME, Ld),
        ("Header", "value", header::VALUE, Ld),
        ("KeyValue", "key", key_value::KEY, Ld),
        ("KeyValue", "value", key_value::VALUE, Ld),
        ("RequestHeaders", "correlation_id", request_headers::CORRELATION_ID, Ld),
        ("RequestHeaders", "method", request_headers::METHOD, Ld),
        ("RequestHeaders", "uri", request_headers::URI, Ld),
        ("RequestHeaders", "headers", request_headers::HEADERS, Ld),
        ("RequestHeaders", "client_addr", request_headers::CLIENT_ADDR, Ld),
        ("RequestHeaders", "metadata", request_headers::METADATA, Ld),
        ("ResponseHeaders", "correlation_id", response_headers::CORRELATION_ID, Ld),
        ("ResponseHeaders", "status", response_headers::STATUS, Varint),
        ("ResponseHeaders", "headers", response_headers::HEADERS, Ld),
        ("Decision", "allow", decision::ALLOW, Ld),
        ("Decision", "block", decision::BLOCK, Ld),
        ("Decision", "redirect", decision::REDIRECT, Ld),
        ("Decision", "challenge", decision::CHALLENGE, Ld),
        ("Decision", "request_headers", decision::REQUEST_HEADERS, Ld),
        ("Decision", "response_headers", decision::RESPONSE_HEADERS, Ld),
        ("Decision", "body", decision::BODY, Ld),
        ("Decision", "needs_more", decision::NEEDS_MORE, Varint),
        ("Decision", "audit", decision::AUDIT, Ld),
        ("Block", "status", block::STATUS, Varint),
        ("Block", "headers", block::HEADERS, Ld),
        ("Block", "body", block::BODY, Ld),
        ("Redirect", "location", redirect::LOCATION, Ld),
        ("Redirect", "status", redirect::STATUS, Varint),
        ("Challenge", "kind", challenge::KIND, Ld),
        ("Challenge", "params", challenge::PARAMS, Ld),
        ("HeaderOp", "kind", header_op::KIND, Varint),
        ("HeaderOp", "name", header_op::NAME, Ld),
        ("HeaderOp", "value", header_op::VALUE, Ld),
        ("BodyMutation", "chunk_index", body_mutation::CHUNK_INDEX, Varint),
        ("BodyMutation", "replace", body_mutation::REPLACE, Ld),
        ("BodyMutation", "drop", body_mutation::DROP, Varint),
        ("Audit", "rule_ids", audit::RULE_IDS, Ld),
        ("Audit", "tags", audit::TAGS, Ld),
        ("Audit", "reason", audit::REASON, Ld),
        ("Audit", "confidence", audit::CONFIDENCE, Fixed32),
        ("Audit", "custom", audit::CUSTOM, Ld),
    ];

    /// Where the constants disagree with `schema`, one line per field.
    fn disagreements(schema: &FileDescriptorSet) -> Vec<String> {
        let mut wrong = Vec::new();
        for &(message_name, field_name, number, wire) in FIELDS {
            let Some(field) = message(schema, message_name).field.iter().find(|f| f.name() == field_name)
            else {
                wrong.push(format!("{message_name}.{field_name}: not in agent.proto"));
                continue;
            };
            if u32::try_from(field.number()) != Ok(number) {
                wrong.push(format!(
                    "{message_name}.{field_name}: schema {}, fast path {number}",
                    field.number()
                ));
            }
            if wire_type(field.r#type()) != wire {
                wrong.push(format!(
                    "{message_name}.{field_name}: schema type {:?} ({:?}), fast path {wire:?}",
                    field.r#type(),
                    wire_type(field.r#type())
                ));
            }
        }
        wrong
    }

    #[test]
    fn every_hand_written_field_number_and_wire_type_is_the_schemas() {
        let wrong = disagreements(&schema());
        assert!(wrong.is_empty(), "the fast paths disagree with agent.proto:\n{}", wrong.join("\n"));
    }

    #[test]
    fn a_renumbered_or_retyped_field_is_reported() {
        let mut schema = schema();
        let file = schema.file.iter_mut().find(|f| f.package() == "agentpool.v1").expect("the file");
        let decision = file.message_type.iter_mut().find(|m| m.name() == "Decision").expect("Decision");
        decision.field.iter_mut().find(|f| f.name() == "audit").expect("audit").number = Some(10);
        decision
            .field
            .iter_mut()
            .find(|f| f.name() == "needs_more")
            .expect("needs_more")
            .set_type(Type::String);
        assert_eq!(
            disagreements(&schema),
            [
                "Decision.needs_more: schema type String (LengthDelimited), fast path Varint",
                "Decision.audit: schema 10, fast path 9",
            ]
        );
    }

    #[test]
    fn the_header_op_kinds_are_the_schemas() {
        let schema = schema();
        let kind = message(&schema, "HeaderOp")
            .enum_type
            .iter()
            .find(|e| e.name() == "Kind")
            .expect("agent.proto has HeaderOp.Kind");
        let value = |name: &str| {
            let v = kind.value.iter().find(|v| v.name() == name).unwrap_or_else(|| panic!("no {name}"));
            u64::try_from(v.number()).expect("a Kind value is not negative")
        };
        assert_eq!(
            [value("KIND_SET"), value("KIND_ADD"), value("KIND_REMOVE")],
            [header_op::KIND_SET, header_op::KIND_ADD, header_op::KIND_REMOVE]
        );
    }
}
