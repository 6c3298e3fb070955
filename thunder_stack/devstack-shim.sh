#!/bin/bash
# The few devstack functions devstack/lib/thunder and devstack/settings use,
# for sourcing them outside devstack (tools/thunder-stack's local stack).
# iniset and iniget edit files through thunder_stack/ini.py with
# $THUNDER_PYTHON (default python3).

function iniset {
    if [[ "$1" == "-sudo" ]]; then
        shift
    fi
    "${THUNDER_PYTHON:-python3}" -m thunder_stack.ini set "$1" "$2" "$3" "$4"
}

function iniget {
    "${THUNDER_PYTHON:-python3}" -m thunder_stack.ini get "$1" "$2" "$3"
}

# trueorfalse DEFAULT VARNAME: devstack's normalisation of a boolean.
function trueorfalse {
    local default=$1
    local value=${!2:-}
    case "${value,,}" in
        "") echo "$default" ;;
        1|yes|true|on) echo True ;;
        0|no|false|off) echo False ;;
        *) echo "$default" ;;
    esac
}
