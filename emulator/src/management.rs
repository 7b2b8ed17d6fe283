//! `<entity>/$management` request-response operations.

use fe2o3_amqp_types::messaging::Properties;
use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::Value;
use serde_amqp::primitives::{Array, OrderedMap, Symbol};
use serde_bytes::ByteBuf;

use crate::broker::{Broker, BrokerError, Settlement, condition};
use crate::config::{CorrelationFilter, Filter, Rule};
use crate::message::{AmqpMessage, timestamp, uuid_from_value, uuid_value, value_message};

type Map = OrderedMap<Value, Value>;

fn get<'a>(map: &'a Map, key: &str) -> Option<&'a Value> {
    map.get(&Value::String(key.to_string()))
        .or_else(|| map.get(&Value::Symbol(Symbol::from(key))))
}

fn items(v: Option<&Value>) -> Vec<Value> {
    match v {
        Some(Value::Array(a)) => a.0.clone(),
        Some(Value::List(l)) => l.clone(),
        Some(other) if !matches!(other, Value::Null) => vec![other.clone()],
        _ => Vec::new(),
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Long(x) => Some(*x),
        Value::Int(x) => Some(i64::from(*x)),
        Value::Short(x) => Some(i64::from(*x)),
        Value::Byte(x) => Some(i64::from(*x)),
        Value::Ulong(x) => i64::try_from(*x).ok(),
        Value::Uint(x) => Some(i64::from(*x)),
        Value::Ushort(x) => Some(i64::from(*x)),
        Value::Ubyte(x) => Some(i64::from(*x)),
        _ => None,
    }
}

fn as_string(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Symbol(s)) => Some(s.0.clone()),
        _ => None,
    }
}

fn bad(description: impl Into<String>) -> BrokerError {
    BrokerError {
        condition: condition::ARGUMENT_ERROR,
        description: description.into(),
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = OrderedMap::new();
    for (k, v) in entries {
        m.insert(Value::String(k.to_string()), v);
    }
    Value::Map(m)
}

fn symbol_map(v: Option<&Value>) -> Option<OrderedMap<Symbol, Value>> {
    match v {
        Some(Value::Map(m)) => {
            let mut out = OrderedMap::new();
            for (k, v) in m {
                let key = match k {
                    Value::String(s) => Symbol::from(s.as_str()),
                    Value::Symbol(s) => s.clone(),
                    _ => continue,
                };
                out.insert(key, v.clone());
            }
            Some(out)
        }
        _ => None,
    }
}

fn rule_filter(desc: &Map) -> Result<Filter, BrokerError> {
    if let Some(Value::Map(sql)) = get(desc, "sql-filter") {
        let expression = as_string(get(sql, "expression"))
            .ok_or_else(|| bad("sql-filter needs an expression"))?;
        crate::filters::SqlExpr::parse(&expression).map_err(bad)?;
        return Ok(Filter::Sql(expression));
    }
    if let Some(Value::Map(c)) = get(desc, "correlation-filter") {
        let text = |k: &str| match get(c, k) {
            Some(Value::Uuid(u)) => Some(uuid::Uuid::from_bytes(*u.as_inner()).to_string()),
            Some(Value::Ulong(u)) => Some(u.to_string()),
            other => as_string(other),
        };
        let mut properties = Vec::new();
        if let Some(Value::Map(props)) = get(c, "properties") {
            for (k, v) in props {
                let Some(key) = as_string(Some(k)) else {
                    continue;
                };
                let json = match v {
                    Value::String(s) => serde_json::Value::from(s.clone()),
                    Value::Bool(b) => serde_json::Value::from(*b),
                    other => match as_i64(other) {
                        Some(n) => serde_json::Value::from(n),
                        None => match other {
                            Value::Double(d) => serde_json::Value::from(d.into_inner()),
                            Value::Float(f) => serde_json::Value::from(f64::from(f.into_inner())),
                            _ => continue,
                        },
                    },
                };
                properties.push((key, json));
            }
        }
        return Ok(Filter::Correlation(CorrelationFilter {
            content_type: text("content-type"),
            correlation_id: text("correlation-id"),
            label: text("label"),
            message_id: text("message-id"),
            reply_to: text("reply-to"),
            reply_to_session_id: text("reply-to-session-id"),
            session_id: text("session-id"),
            to: text("to"),
            properties,
        }));
    }
    Ok(Filter::True)
}

/// A successful operation: status code and body.
struct Ok2(i32, Value);

/// Handle a request addressed to `<entity>/$management`; returns the encoded reply.
pub fn handle(broker: &Broker, entity: &str, request: &AmqpMessage) -> Vec<u8> {
    let operation = match request.property("operation") {
        Some(SimpleValue::String(s)) => s.clone(),
        Some(SimpleValue::Symbol(s)) => s.0.clone(),
        _ => String::new(),
    };
    let body = match request.value_body() {
        Some(Value::Map(m)) => m,
        _ => OrderedMap::new(),
    };
    let result = dispatch(broker, entity, &operation, &body);
    let mut app = OrderedMap::new();
    let (code, desc, cond, value) = match result {
        Ok(Ok2(code, v)) => (code, "OK".to_string(), None, v),
        Err(e) => (
            e.status_code(),
            e.description.clone(),
            Some(e.condition),
            Value::Null,
        ),
    };
    app.insert("statusCode".to_string(), SimpleValue::Int(code));
    app.insert("status-code".to_string(), SimpleValue::Int(code));
    app.insert(
        "statusDescription".to_string(),
        SimpleValue::String(desc.clone()),
    );
    app.insert("status-description".to_string(), SimpleValue::String(desc));
    if let Some(c) = cond {
        app.insert(
            "errorCondition".to_string(),
            SimpleValue::Symbol(Symbol::from(c)),
        );
    }
    let properties = Properties {
        correlation_id: request.message_id().cloned(),
        to: request.properties.as_ref().and_then(|p| p.reply_to.clone()),
        ..Default::default()
    };
    value_message(properties, app, value)
}

fn dispatch(
    broker: &Broker,
    entity: &str,
    operation: &str,
    body: &Map,
) -> Result<Ok2, BrokerError> {
    let op = operation
        .strip_prefix("com.microsoft:")
        .unwrap_or(operation);
    match op {
        "renew-lock" => {
            let tokens: Vec<uuid::Uuid> = items(get(body, "lock-tokens"))
                .iter()
                .filter_map(uuid_from_value)
                .collect();
            let exp = broker.renew_locks(&tokens)?;
            Ok(Ok2(
                200,
                map(vec![(
                    "expirations",
                    Value::Array(Array(exp.into_iter().map(timestamp).collect())),
                )]),
            ))
        }
        "peek-message" => {
            let from = get(body, "from-sequence-number")
                .and_then(as_i64)
                .unwrap_or(1);
            let count = get(body, "message-count")
                .and_then(as_i64)
                .unwrap_or(1)
                .max(0) as usize;
            let session = as_string(get(body, "session-id"));
            let msgs = broker.peek(entity, from, count, session.as_deref())?;
            if msgs.is_empty() {
                return Ok(Ok2(204, map(vec![])));
            }
            let list = msgs
                .into_iter()
                .map(|m| map(vec![("message", Value::Binary(ByteBuf::from(m)))]))
                .collect();
            Ok(Ok2(200, map(vec![("messages", Value::List(list))])))
        }
        "schedule-message" => {
            let mut msgs = Vec::new();
            for item in items(get(body, "messages")) {
                let Value::Map(m) = item else {
                    return Err(bad("messages must be maps"));
                };
                let Some(Value::Binary(b)) = get(&m, "message") else {
                    return Err(bad("message must be binary"));
                };
                let msg = AmqpMessage::decode(b).map_err(|e| bad(e.0))?;
                let at = match msg.annotation("x-opt-scheduled-enqueue-time") {
                    Some(Value::Timestamp(t)) => t.milliseconds(),
                    _ => crate::message::now_ms(),
                };
                msgs.push((msg, at));
            }
            let seqs = broker.schedule(entity, msgs)?;
            Ok(Ok2(
                200,
                map(vec![(
                    "sequence-numbers",
                    Value::Array(Array(seqs.into_iter().map(Value::Long).collect())),
                )]),
            ))
        }
        "cancel-scheduled-message" => {
            let seqs: Vec<i64> = items(get(body, "sequence-numbers"))
                .iter()
                .filter_map(as_i64)
                .collect();
            broker.cancel_scheduled(entity, &seqs)?;
            Ok(Ok2(200, map(vec![])))
        }
        "receive-by-sequence-number" => {
            let seqs: Vec<i64> = items(get(body, "sequence-numbers"))
                .iter()
                .filter_map(as_i64)
                .collect();
            let mode = get(body, "receiver-settle-mode")
                .and_then(as_i64)
                .unwrap_or(1);
            let session = as_string(get(body, "session-id"));
            let deliveries =
                broker.receive_deferred(entity, &seqs, mode != 0, session.as_deref())?;
            let list = deliveries
                .into_iter()
                .map(|d| {
                    map(vec![
                        ("lock-token", uuid_value(d.lock_token)),
                        ("message", Value::Binary(ByteBuf::from(d.payload))),
                    ])
                })
                .collect();
            Ok(Ok2(200, map(vec![("messages", Value::List(list))])))
        }
        "update-disposition" => {
            let status = as_string(get(body, "disposition-status")).unwrap_or_default();
            let tokens: Vec<uuid::Uuid> = items(get(body, "lock-tokens"))
                .iter()
                .filter_map(uuid_from_value)
                .collect();
            let props = symbol_map(get(body, "properties-to-modify"));
            for t in tokens {
                let how = match status.as_str() {
                    "completed" => Settlement::Complete,
                    "abandoned" => Settlement::Abandon(props.clone()),
                    "defered" | "deferred" => Settlement::Defer(props.clone()),
                    "suspended" => Settlement::DeadLetter {
                        reason: as_string(get(body, "deadletter-reason")),
                        description: as_string(get(body, "deadletter-description")),
                        annotations: props.clone(),
                    },
                    other => return Err(bad(format!("unknown disposition-status {other}"))),
                };
                broker.settle(t, how)?;
            }
            Ok(Ok2(200, map(vec![])))
        }
        "renew-session-lock" => {
            let sid =
                as_string(get(body, "session-id")).ok_or_else(|| bad("session-id required"))?;
            let until = broker.renew_session_lock(entity, &sid)?;
            Ok(Ok2(200, map(vec![("expiration", timestamp(until))])))
        }
        "get-session-state" => {
            let sid =
                as_string(get(body, "session-id")).ok_or_else(|| bad("session-id required"))?;
            let state = broker.session_state(entity, &sid)?;
            Ok(Ok2(
                200,
                map(vec![(
                    "session-state",
                    Value::Binary(ByteBuf::from(state.unwrap_or_default())),
                )]),
            ))
        }
        "set-session-state" => {
            let sid =
                as_string(get(body, "session-id")).ok_or_else(|| bad("session-id required"))?;
            let state = match get(body, "session-state") {
                Some(Value::Binary(b)) => Some(b.to_vec()),
                _ => None,
            };
            broker.set_session_state(entity, &sid, state)?;
            Ok(Ok2(200, map(vec![])))
        }
        "get-message-sessions" => {
            let skip = get(body, "skip").and_then(as_i64).unwrap_or(0).max(0) as usize;
            let top = get(body, "top")
                .and_then(as_i64)
                .unwrap_or(i64::from(i32::MAX))
                .max(0) as usize;
            let ids: Vec<Value> = broker
                .session_ids(entity)?
                .into_iter()
                .skip(skip)
                .take(top)
                .map(Value::String)
                .collect();
            if ids.is_empty() {
                return Ok(Ok2(204, map(vec![])));
            }
            let next_skip = skip.saturating_add(ids.len()).min(i32::MAX as usize) as i32;
            Ok(Ok2(
                200,
                map(vec![
                    ("skip", Value::Int(next_skip)),
                    ("sessions-ids", Value::Array(Array(ids))),
                ]),
            ))
        }
        "add-rule" => {
            let name =
                as_string(get(body, "rule-name")).ok_or_else(|| bad("rule-name required"))?;
            let Some(Value::Map(desc)) = get(body, "rule-description") else {
                return Err(bad("rule-description required"));
            };
            let filter = rule_filter(desc)?;
            broker.add_rule(entity, &Rule { name, filter })?;
            Ok(Ok2(200, map(vec![])))
        }
        "remove-rule" => {
            let name =
                as_string(get(body, "rule-name")).ok_or_else(|| bad("rule-name required"))?;
            broker.remove_rule(entity, &name)?;
            Ok(Ok2(200, map(vec![])))
        }
        other => Err(BrokerError {
            condition: "amqp:not-implemented",
            description: format!("management operation {other} is not supported by the emulator"),
        }),
    }
}
