// A client cloudbus did not write: the official JavaScript SDK @azure/service-bus, for
// tests/servicebus/interop_js.rs. Install it with
// `npm ci --prefix adapters/azure/tests/servicebus/js`.
//
//   node servicebus_client.mjs send <connection string> <queue> <messages.json>
//       messages: [{"bodyBase64": str, "messageId": str?, "contentType": str?,
//                   "correlationId": str?, "subject": str?, "sessionId": str?,
//                   "applicationProperties": {k: v}?}]
//       prints {"sent": n}
//   node servicebus_client.mjs receive <connection string> <queue> <count>
//           [--session <id>] [--dead-letter-queue] [--settle complete|abandon|deadLetter]
//           [--reason <text>] [--description <text>] [--wait-ms <ms>]
//       receives up to <count> messages (from the session <id> through acceptSession, or
//       from the dead-letter sub-queue), settles each as --settle says (complete by
//       default; deadLetter with --reason and --description) and prints
//       [{"bodyBase64", "bodyType", "messageId", "contentType", "correlationId",
//         "subject", "sessionId", "deliveryCount", "sequenceNumber",
//         "applicationProperties", "deadLetterReason", "deadLetterErrorDescription",
//         "deadLetterSource"}]
//
// The emulator's connection string has UseDevelopmentEmulator=true: the SDK then dials
// plain TCP on port 5672 of the endpoint's host, without TLS.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { ServiceBusClient } from "@azure/service-bus";

async function send(connectionString, queue, path) {
  const messages = JSON.parse(readFileSync(path, "utf8")).map((m) => ({
    body: Buffer.from(m.bodyBase64, "base64"),
    messageId: m.messageId,
    contentType: m.contentType,
    correlationId: m.correlationId,
    subject: m.subject,
    sessionId: m.sessionId,
    applicationProperties: m.applicationProperties,
  }));
  const client = new ServiceBusClient(connectionString);
  try {
    const sender = client.createSender(queue);
    await sender.sendMessages(messages);
    await sender.close();
  } finally {
    await client.close();
  }
  return { sent: messages.length };
}

// JSON for a property or body value: binary as base64, dates as ISO text.
function plain(value) {
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    return Buffer.from(value).toString("base64");
  }
  if (value instanceof Date) {
    return value.toISOString();
  }
  return value;
}

// The body as bytes: with skipParsingBodyAsJson a data section's body is its Buffer; an
// AMQP value or sequence body (not what cloudbus sends) is shown as its JSON text.
function bodyBytes(message) {
  const body = message.body;
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) {
    return Buffer.from(body);
  }
  return Buffer.from(typeof body === "string" ? body : JSON.stringify(body), "utf8");
}

function describe(m) {
  const properties = {};
  for (const [k, v] of Object.entries(m.applicationProperties ?? {})) {
    properties[k] = plain(v);
  }
  return {
    bodyBase64: bodyBytes(m).toString("base64"),
    bodyType: m._rawAmqpMessage.bodyType,
    messageId: m.messageId === undefined ? null : String(m.messageId),
    contentType: m.contentType ?? null,
    correlationId: m.correlationId === undefined ? null : String(m.correlationId),
    subject: m.subject ?? null,
    sessionId: m.sessionId ?? null,
    deliveryCount: m.deliveryCount ?? null,
    sequenceNumber: m.sequenceNumber === undefined ? null : m.sequenceNumber.toString(),
    applicationProperties: properties,
    deadLetterReason: m.deadLetterReason ?? null,
    deadLetterErrorDescription: m.deadLetterErrorDescription ?? null,
    deadLetterSource: m.deadLetterSource ?? null,
  };
}

async function receive(connectionString, queue, count, options) {
  const waitMs = Number(options["wait-ms"] ?? 1000);
  const receiverOptions = { skipParsingBodyAsJson: true };
  const got = [];
  const client = new ServiceBusClient(connectionString);
  try {
    let receiver;
    if (options.session !== undefined) {
      receiver = await client.acceptSession(queue, options.session, receiverOptions);
    } else if (options["dead-letter-queue"]) {
      receiver = client.createReceiver(queue, { ...receiverOptions, subQueueType: "deadLetter" });
    } else {
      receiver = client.createReceiver(queue, receiverOptions);
    }
    const deadline = Date.now() + 15000;
    while (got.length < count && Date.now() < deadline) {
      const messages = await receiver.receiveMessages(count - got.length, {
        maxWaitTimeInMs: waitMs,
      });
      for (const m of messages) {
        got.push(describe(m));
        switch (options.settle ?? "complete") {
          case "complete":
            await receiver.completeMessage(m);
            break;
          case "abandon":
            await receiver.abandonMessage(m);
            break;
          case "deadLetter":
            await receiver.deadLetterMessage(m, {
              deadLetterReason: options.reason,
              deadLetterErrorDescription: options.description,
            });
            break;
          default:
            throw new Error(`unknown --settle ${options.settle}`);
        }
      }
    }
    await receiver.close();
  } finally {
    await client.close();
  }
  return got;
}

async function main() {
  const { positionals, values } = parseArgs({
    allowPositionals: true,
    options: {
      session: { type: "string" },
      "dead-letter-queue": { type: "boolean" },
      settle: { type: "string" },
      reason: { type: "string" },
      description: { type: "string" },
      "wait-ms": { type: "string" },
    },
  });
  const [command, connectionString, queue, arg] = positionals;
  if (positionals.length !== 4 || !["send", "receive"].includes(command)) {
    throw new Error("usage: servicebus_client.mjs send|receive <connection string> <queue> <file|count> [options]");
  }
  const result =
    command === "send"
      ? await send(connectionString, queue, arg)
      : await receive(connectionString, queue, Number(arg), values);
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
