//! Claims-based security (`$cbs`): every put-token is accepted with status 202.

use fe2o3_amqp_types::messaging::Properties;
use fe2o3_amqp_types::primitives::SimpleValue;
use serde_amqp::Value;
use serde_amqp::primitives::OrderedMap;

use crate::message::{AmqpMessage, value_message};

/// Build the reply to a CBS request: 202 for put-token (any token is
/// accepted), 400 for anything else. The correlation-id keeps the request's
/// message-id with its AMQP type.
pub fn reply(request: &AmqpMessage) -> Vec<u8> {
    let operation = match request.property("operation") {
        Some(SimpleValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let (code, description) = if operation == "put-token" {
        (202, "Accepted")
    } else {
        (400, "Unsupported CBS operation")
    };
    let mut app = OrderedMap::new();
    app.insert("status-code".to_string(), SimpleValue::Int(code));
    app.insert(
        "status-description".to_string(),
        SimpleValue::String(description.into()),
    );
    let properties = Properties {
        correlation_id: request.message_id().cloned(),
        to: request.properties.as_ref().and_then(|p| p.reply_to.clone()),
        ..Default::default()
    };
    value_message(properties, app, Value::Null)
}
