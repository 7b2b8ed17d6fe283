# shellcheck shell=bash disable=SC2034  # the rmq_* variables are for the scripts that source this
# Environment of the isolated RabbitMQ node, sourced (not run) by rabbitmq/start, rabbitmq/stop
# and rabbitmq/ctl, so that the server and the CLI tools agree on the node, its files and ports.
#
# Sets the shell variables rmq_dir, rmq_port, rmq_stream_port, rmq_mgmt_port, rmq_url, and
# exports what RabbitMQ and Erlang read. Every port is on 127.0.0.1, never 5672 (that port
# belongs to the Service Bus tests, which bind 127.0.0.x:5672).
#
# Environment (all optional):
#   RABBITMQ_DIR    node directory: config, data, cookie, pid file, server.out
#                   (default <repo>/target/rabbitmq)
#   RABBITMQ_PORT   AMQP port on 127.0.0.1 (default 5673; rabbitmq/start refuses 5672)
# Fixed: stream 127.0.0.1:5553, management 127.0.0.1:15673, distribution 127.0.0.1:25673,
# epmd 127.0.0.1:4370 (not the default 4369), node name cloudbus@localhost.

rmq_repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd -P)"
rmq_dir="${RABBITMQ_DIR:-$rmq_repo/target/rabbitmq}"
rmq_port="${RABBITMQ_PORT:-5673}"
rmq_stream_port=5553
rmq_mgmt_port=15673
rmq_url="amqp://guest:guest@127.0.0.1:$rmq_port/%2f"
if ! [[ "$rmq_port" =~ ^[0-9]+$ ]] || ((rmq_port < 1 || rmq_port > 65535)); then
    echo "rabbitmq: ERROR: RABBITMQ_PORT=$rmq_port is not a port number" >&2
    return 1
fi
mkdir -p "$rmq_dir"
rmq_dir="$(cd "$rmq_dir" && pwd -P)"

# Inherited settings that would add listeners or move files elsewhere.
unset RABBITMQ_NODE_PORT RABBITMQ_NODE_IP_ADDRESS RABBITMQ_BASE RABBITMQ_MNESIA_DIR \
    RABBITMQ_LOGS RABBITMQ_CONFIG_FILES RABBITMQ_ENABLED_PLUGINS RABBITMQ_USE_LONGNAME \
    RABBITMQ_SERVER_START_ARGS RABBITMQ_SERVER_ERL_ARGS

export RABBITMQ_NODENAME=cloudbus@localhost
export RABBITMQ_CONFIG_FILE="$rmq_dir/rabbitmq.conf"
export RABBITMQ_ADVANCED_CONFIG_FILE="$rmq_dir/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$rmq_dir/enabled_plugins"
# An empty env file instead of /etc/rabbitmq/rabbitmq-env.conf (which could set another node name).
export RABBITMQ_CONF_ENV_FILE="$rmq_dir/rabbitmq-env.conf"
export RABBITMQ_MNESIA_BASE="$rmq_dir/mnesia"
export RABBITMQ_LOG_BASE="$rmq_dir/log"
export RABBITMQ_PID_FILE="$rmq_dir/rabbitmq.pid"
# The Erlang cookie (.erlang.cookie) is created in, and read from, $HOME.
export HOME="$rmq_dir"
export RABBITMQ_DIST_PORT=25673
export ERL_EPMD_ADDRESS=127.0.0.1
export ERL_EPMD_PORT=4370
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
# The /usr/sbin wrappers switch to the rabbitmq user; the real scripts are here.
export PATH="/usr/lib/rabbitmq/bin:$PATH"
