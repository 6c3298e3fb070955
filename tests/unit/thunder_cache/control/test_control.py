# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""Tests for thunder_cache.control.server: the daemon's control socket."""

import json
import logging
import os
import random
import socket
import stat
import tempfile
import threading
import time

import pytest

from thunder_cache.control import client as control_client
from thunder_cache.control import protocol as control_protocol
from thunder_cache.control import server as control_server
from thunder_cache import errors

LOGGER = 'thunder_cache.control.server'


class Refused(Exception):
    """An answer, not a fault (passed as ``expected``)."""


def _fail(exc):
    def handler(**_args):
        raise exc
    return handler


def _add(a, b):
    return a + b


def _echo(**args):
    return args


HANDLERS = {
    'add': _add,
    'echo': _echo,
    'none': lambda: None,
    'refused': _fail(Refused('no, thanks')),
    'missing': _fail(KeyError('vol-1')),
    'broken': _fail(RuntimeError('internal fault')),
    'internal_type_error': lambda: len(5),
}


@pytest.fixture
def sock_dir():
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path of a
    # long test name would not fit.
    with tempfile.TemporaryDirectory(prefix='ctl-', dir='/tmp') as d:
        yield d


@pytest.fixture
def server(sock_dir):
    srv = control_server.ControlServer(os.path.join(sock_dir, 'control.sock'),
                                       HANDLERS, expected=(Refused,))
    thread = srv.start()
    yield srv
    srv.stop()
    thread.join(5)
    assert not thread.is_alive()


@pytest.fixture
def client(server):
    return control_client.ControlClient(server.path, timeout=5)


def _connect(path, timeout=5):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def _exchange(path, data):
    """Send ``data``, close our side, return the reply lines until EOF."""
    sock = _connect(path)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        with sock.makefile('rb') as f:
            return _lines(f.read())
    finally:
        sock.close()


def _lines(data):
    """``data`` cut after each newline (only newlines end a line)."""
    lines = [line + b'\n' for line in data.split(b'\n')]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _replies(lines):
    return [json.loads(line) for line in lines]


# -- parse_request -----------------------------------------------------------

def test_parse_request():
    assert control_protocol.parse_request(b'{"op": "ping", "x": [1]}\n') == (
        'ping', {'x': [1]})


@pytest.mark.parametrize('line', [
    b'not json\n', b'[1, 2]\n', b'"op"\n', b'null\n', b'{}\n',
    b'{"op": ""}\n', b'{"op": 5}\n', b'{"op": null}\n', b'{"x": "ping"}\n',
    b'\xff\xfe\x00garbage\n',
    b'{"op": "x", "n": ' + b'1' * 5000 + b'}\n',
    b'{"op": "x", "pad": "' + b'a' * control_protocol.MAX_LINE + b'"}\n',
])
def test_parse_request_refuses(line):
    with pytest.raises(errors.BadRequest):
        control_protocol.parse_request(line)


def test_parse_request_refuses_deep_nesting():
    with pytest.raises(errors.BadRequest):
        control_protocol.parse_request(b'[' * 60000 + b'\n')


# -- round trips -------------------------------------------------------------

def test_round_trip(client):
    assert client.call('add', a=2, b=3) == 5
    assert client.call('echo', volume_id='v', size=1 << 40,
                       nested={'l': [1, None, True]}) == {
        'volume_id': 'v', 'size': 1 << 40, 'nested': {'l': [1, None, True]}}
    assert client.call('none') is None


def test_expected_error_reported_without_traceback(client, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for op, kind in (('refused', 'Refused'), ('missing', 'KeyError')):
        with pytest.raises(control_client.ControlError) as info:
            client.call(op)
        assert info.value.kind == kind
    assert not [r for r in caplog.records if r.exc_info]


def test_expected_error_message(client):
    with pytest.raises(control_client.ControlError) as info:
        client.call('refused')
    assert info.value.kind == 'Refused'
    assert info.value.message == 'no, thanks'
    assert str(info.value) == 'Refused: no, thanks'


def test_unexpected_error_is_logged(client, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(control_client.ControlError) as info:
        client.call('broken')
    assert info.value.kind == 'RuntimeError'
    assert info.value.message == 'internal fault'
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].exc_info[0] is RuntimeError
    assert 'broken' in logged[0].getMessage()


def test_unknown_op(client):
    with pytest.raises(control_client.ControlError) as info:
        client.call('format_disk')
    assert info.value.kind == 'BadRequest'
    assert 'unknown operation' in info.value.message


@pytest.mark.parametrize('args', [{'a': 1}, {'a': 1, 'b': 2, 'c': 3},
                                  {'x': 1}])
def test_wrong_arguments(client, args, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(control_client.ControlError) as info:
        client.call('add', **args)
    assert info.value.kind == 'BadRequest'
    assert 'bad arguments for add' in info.value.message
    assert not [r for r in caplog.records if r.exc_info]


def test_type_error_inside_handler_is_a_fault(client, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(control_client.ControlError) as info:
        client.call('internal_type_error')
    assert info.value.kind == 'TypeError'
    assert [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize('line, message', [
    (b'not json\n', 'not JSON'),
    (b'[1]\n', 'not a JSON object'),
    (b'{"a": 1}\n', 'no "op"'),
    (b'{"op": ["add"]}\n', 'no "op"'),
])
def test_malformed_requests(server, line, message):
    [reply] = _replies(_exchange(server.path, line))
    assert reply['ok'] is False
    assert reply['error'] == 'BadRequest'
    assert message in reply['message']


def test_several_requests_on_one_connection(server):
    sock = _connect(server.path)
    with sock, sock.makefile('rb') as f:
        sock.sendall(b'{"op": "add", "a": 1, "b": 2}\n'
                     b'{"op": "nope"}\n'
                     b'{"op": "echo", "k": "v"}\n')
        replies = [json.loads(f.readline()) for _ in range(3)]
        # The connection stays open for more.
        sock.sendall(b'{"op": "add", "a": 10, "b": 20}\n')
        replies.append(json.loads(f.readline()))
    assert replies == [
        {'ok': True, 'result': 3},
        {'ok': False, 'error': 'BadRequest',
         'message': "unknown operation 'nope'"},
        {'ok': True, 'result': {'k': 'v'}},
        {'ok': True, 'result': 30}]


def test_line_of_max_length_accepted(server):
    prefix = b'{"op": "echo", "pad": "'
    suffix = b'"}\n'
    pad = control_protocol.MAX_LINE - len(prefix) - len(suffix)
    line = prefix + b'a' * pad + suffix
    assert len(line) == control_protocol.MAX_LINE
    [reply] = _replies(_exchange(server.path, line))
    assert reply['ok'] is True
    assert len(reply['result']['pad']) == control_protocol.MAX_LINE - 26


def test_oversized_line_refused_and_connection_closed(server):
    line = (b'{"op": "echo", "pad": "' + b'a' * control_protocol.MAX_LINE +
            b'"}\n')
    sock = _connect(server.path)
    with sock, sock.makefile('rb') as f:
        sock.sendall(line)
        reply = json.loads(f.readline())
        assert f.readline() == b''  # closed: the rest is not read
    assert reply == {'ok': False, 'error': 'BadRequest',
                     'message': 'request line too long or not ended by '
                                'a newline'}


def test_client_refuses_oversized_request(client):
    with pytest.raises(control_client.ControlError) as info:
        client.call('echo', pad='a' * control_protocol.MAX_LINE)
    assert info.value.kind == 'BadRequest'


def test_client_without_server(sock_dir):
    client = control_client.ControlClient(
        os.path.join(sock_dir, 'missing.sock'))
    with pytest.raises(control_client.ControlError) as info:
        client.call('ping')
    assert info.value.kind == 'Unavailable'
    assert 'missing.sock' in info.value.message


def test_client_after_stop(sock_dir):
    path = os.path.join(sock_dir, 'c.sock')
    srv = control_server.ControlServer(path, HANDLERS)
    srv.start()
    assert control_client.ControlClient(path).call('add', a=1, b=1) == 2
    srv.stop()
    assert not os.path.exists(path)
    with pytest.raises(control_client.ControlError) as info:
        control_client.ControlClient(path).call('add', a=1, b=1)
    assert info.value.kind == 'Unavailable'


def _fake_daemon(path, answer):
    """A one-shot server that reads a request and sends ``answer``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.makefile('rb').readline()
            if answer is not None:
                conn.sendall(answer)
                conn.shutdown(socket.SHUT_WR)
            else:
                threading.Event().wait(2)
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _fake_call_error(sock_dir, answer, timeout=5):
    """The ControlError of a ping to a fake daemon answering ``answer``."""
    path = os.path.join(sock_dir, 'fake.sock')
    thread = _fake_daemon(path, answer)
    with pytest.raises(control_client.ControlError) as info:
        control_client.ControlClient(path, timeout=timeout).call('ping')
    thread.join(5)
    return info.value


@pytest.mark.parametrize('answer', [b'', b'garbage\n', b'[1]\n',
                                    b'{"result": 1}\n', b'{"ok"\n'])
def test_client_unreadable_answer(sock_dir, answer):
    assert _fake_call_error(sock_dir, answer).kind == 'Unavailable'


def test_client_error_answer_without_details(sock_dir):
    error = _fake_call_error(sock_dir, b'{"ok": false}\n')
    assert (error.kind, error.message) == ('Error', '')


def test_client_timeout(sock_dir):
    error = _fake_call_error(sock_dir, None, timeout=0.2)
    assert error.kind == 'Unavailable'


def test_requests_served_concurrently(sock_dir):
    release = threading.Event()
    entered = threading.Event()

    def slow():
        entered.set()
        return release.wait(5)

    path = os.path.join(sock_dir, 'c.sock')
    srv = control_server.ControlServer(path, {'slow': slow, 'add': _add})
    srv.start()
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            slow=control_client.ControlClient(path).call('slow')))
        thread.start()
        assert entered.wait(5)
        # Answered while the other request is still in its handler.
        assert control_client.ControlClient(path, timeout=5).call(
            'add', a=1, b=2) == 3
        assert thread.is_alive()
        release.set()
        thread.join(5)
        assert result == {'slow': True}
    finally:
        release.set()
        srv.stop()


# -- the socket file ---------------------------------------------------------

def test_socket_mode(server):
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_socket_custom_mode_and_directory_created(sock_dir):
    path = os.path.join(sock_dir, 'sub', 'dir', 'c.sock')
    srv = control_server.ControlServer(path, HANDLERS, mode=0o600)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.server_close()


def test_stale_socket_replaced(sock_dir):
    path = os.path.join(sock_dir, 'c.sock')
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, as after a crash
    srv = control_server.ControlServer(path, HANDLERS)
    srv.start()
    try:
        assert control_client.ControlClient(path).call('add', a=2, b=2) == 4
    finally:
        srv.stop()


def test_regular_file_at_path_not_removed(sock_dir):
    path = os.path.join(sock_dir, 'c.sock')
    with open(path, 'w') as f:
        f.write('precious')
    with pytest.raises(OSError):
        control_server.ControlServer(path, HANDLERS)
    with open(path) as f:
        assert f.read() == 'precious'


# -- hostile input -----------------------------------------------------------

VALID = [b'{"op": "echo", "a": 1}', b'{"op": "add", "a": 1, "b": 2}',
         b'{"op": "refused"}', b'{"op": "none"}', b'[]', b'{}']


def _hostile_line(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    base = bytearray(rng.choice(VALID))
    if kind == 1:
        for _ in range(rng.randrange(1, 6)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        return bytes(base)
    if kind == 2:
        cut = rng.randrange(len(base))
        return bytes(base[:cut] + base[cut + rng.randrange(1, 4):])
    pieces = [b'{', b'}', b'[', b']', b'"', b'op', b':', b',', b'1e999',
              b'NaN', b'-0', b'"\\ud800"', b'\\', b'null', b'true',
              b'"echo"', b'"add"', b' ', b'\x00', b'\xc3']
    return b''.join(rng.choice(pieces) for _ in range(rng.randrange(30)))


def test_fuzzed_lines_always_answered(server):
    rng = random.Random(20240607)
    for _ in range(300):
        data = _hostile_line(rng)
        if rng.random() < 0.8:
            data += b'\n'
        lines = _lines(data)
        replies = _exchange(server.path, data)
        # One answer per line (an unterminated last line is refused
        # before the connection closes).
        assert len(replies) == len(lines), (data, replies)
        for raw in replies:
            assert raw.endswith(b'\n')
            reply = json.loads(raw)
            assert isinstance(reply, dict)
            assert isinstance(reply['ok'], bool), reply
            if not reply['ok']:
                assert isinstance(reply['error'], str)
                assert isinstance(reply['message'], str)
    # Still serving.
    assert control_client.ControlClient(server.path).call('add', a=4, b=5) == 9


def test_fuzzed_lines_on_one_connection(server):
    rng = random.Random(7)
    lines = [_hostile_line(rng).replace(b'\n', b' ') + b'\n'
             for _ in range(200)]
    replies = _replies(_exchange(server.path, b''.join(lines)))
    assert len(replies) == len(lines)
    assert all(isinstance(r['ok'], bool) for r in replies)
    expected = [server.dispatch(line) for line in lines]
    assert [(r['ok'], r.get('error')) for r in replies] == [
        (r['ok'], r.get('error')) for r in expected]


def test_client_closing_mid_request_does_not_stop_the_server(server):
    for data in (b'{"op": "add"', b'', b'{"op": "add", "a": 1, "b": 2}\n'):
        sock = _connect(server.path)
        sock.sendall(data)
        sock.close()
    assert control_client.ControlClient(server.path).call('add', a=1, b=2) == 3


def test_connections_beyond_the_limit_are_answered_busy(sock_dir):
    """Idle connections cannot take a thread each without bound."""
    path = os.path.join(sock_dir, 'c.sock')
    srv = control_server.ControlServer(path, HANDLERS, max_connections=3)
    srv.start()
    held = [_connect(path) for _ in range(3)]
    try:
        # Accepted in order: the three take the slots, waiting for a line.
        extra = _connect(path)
        with extra.makefile('rb') as f:
            reply = json.loads(f.readline())
        extra.close()
        assert reply['ok'] is False and reply['error'] == 'Busy'
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert control_client.ControlClient(path, timeout=5).call(
                    'add', a=2, b=3) == 5
                break
            except control_client.ControlError as e:
                assert e.kind == 'Busy' and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
        srv.stop()
