//! A Docker-free Azure Service Bus emulator speaking AMQP 1.0.
