#!/bin/bash
# devstack/plugin.sh: the VMThunder devstack plugin.
#
# Enable in local.conf with
#   enable_plugin vmthunder <git URL of this repository>
# next to a Ceph cluster (devstack-plugin-ceph, enabled first). It installs
# the package, configures ThunderDriver as the Cinder backend "thunder" and
# the thunder Glance store (devstack/lib/thunder). With
#   THUNDER_PEER_MODE=True
# it also runs the node cache daemon (thunder-cache) and adds the peer-mode
# backend "thunder-peer", whose volumes live on the node.

if [[ "$1" == "source" ]]; then
    # shellcheck disable=SC1091
    source "$THUNDER_PLUGIN_DIR/lib/thunder"
elif [[ "$1" == "stack" && "$2" == "install" ]]; then
    echo_summary "Installing VMThunder"
    setup_develop "$THUNDER_DIR"
    install_thunder "${PYTHON:-python3}"
elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
    echo_summary "Configuring Cinder and Glance for VMThunder"
    if is_service_enabled c-vol c-api; then
        # The backend section itself is written by devstack's
        # configure_cinder through configure_cinder_backend_thunder when
        # CINDER_ENABLED_BACKENDS lists thunder:NAME; write it here too for
        # setups that list it otherwise.
        if [[ ",$CINDER_ENABLED_BACKENDS," != *",thunder:"* ]]; then
            configure_thunder_cinder_backend "$THUNDER_CINDER_BACKEND"
        fi
        if [[ "$THUNDER_PEER_MODE" == "True" &&
              ",$CINDER_ENABLED_BACKENDS," != *",thunder_peer:"* ]]; then
            configure_thunder_peer_backend "$THUNDER_PEER_BACKEND"
        fi
        configure_thunder_cinder_glance
    fi
    if is_service_enabled g-api; then
        configure_thunder_glance_store
        configure_thunder_glance_import
    fi
    if is_service_enabled n-api n-cpu; then
        configure_thunder_nova
    fi
    if [[ "$THUNDER_PEER_MODE" == "True" ]]; then
        configure_thunder_cache
        # Started now, before devstack starts cinder-volume, whose peer
        # backend checks at start that the daemon answers. It runs as root:
        # it mounts the volume files for losetup and qemu.
        echo_summary "Starting thunder-cache"
        run_process thunder-cache \
            "$(command -v thunder-cache) --config-file $THUNDER_CACHE_CONF" \
            "" root
    fi
elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
    if is_service_enabled n-cpu && [[ -n "$THUNDER_NODE_AVAILABILITY_ZONE" ]]
    then
        echo_summary "Adding this compute node to its availability zone"
        join_thunder_availability_zone
    fi
elif [[ "$1" == "stack" && "$2" == "test-config" ]]; then
    if is_service_enabled tempest; then
        configure_thunder_tempest
    fi
elif [[ "$1" == "unstack" ]]; then
    if [[ "$THUNDER_PEER_MODE" == "True" ]]; then
        stop_process thunder-cache
        if [[ "$THUNDER_VOLUME_SERVER" == "native" ]]; then
            stop_thunder_volume_server
        fi
    fi
fi
