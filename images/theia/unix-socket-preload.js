// unix-socket-preload.js - make a Node HTTP server (Theia's backend) serve on the listening socket
// the supervisor hands over as fd 3 (systemd-style socket activation).
//
//   LISTEN_FDS=1 LISTEN_FDNAMES=ide [LISTEN_PID=<pid>] \
//     node --require /opt/theia/unix-socket-preload.js /opt/theia/lib/backend/main.js ...  3<>socket
//
// Theia's `--port` takes only a number, so this preload redirects the process's first `listen()`
// on an http/https server to `listen({fd: 3})`, whatever port and host the caller asked for. The
// listen callback still fires; the server's address() is the string `fd 3 (LISTEN_FDS)` (Node
// has none for an adopted descriptor; Theia logs it as a socket path).
//
// - The supervisor bound the socket in a directory only root can enter and listened on it; Node's
//   own listen() on fd 3 stamps the socket's peer credentials with this process's uid, which the
//   supervisor's front door checks before it forwards a byte.
// - LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID are deleted from process.env as soon as this file
//   loads, so nothing the IDE starts later (file watcher, terminals, language servers) takes fd 3
//   for its own.
// - Fail closed: without LISTEN_FDS=1 (or with a LISTEN_PID that is not this process) the first
//   http/https listen() throws instead of opening a TCP port that every tenant of the pod could
//   reach.
'use strict';

const LISTEN_FD = 3;
const ADDRESS = `fd ${LISTEN_FD} (LISTEN_FDS)`;
const fds = process.env.LISTEN_FDS;
const pid = process.env.LISTEN_PID;
delete process.env.LISTEN_FDS;
delete process.env.LISTEN_FDNAMES;
delete process.env.LISTEN_PID;

const net = require('net');
const http = require('http');
const https = require('https');
const originalListen = net.Server.prototype.listen;

const refusal = fds !== '1'
    ? `LISTEN_FDS is ${fds === undefined ? 'not set' : `'${fds}', not '1'`}`
    : pid !== undefined && pid !== String(process.pid)
        ? `LISTEN_PID ${pid} is not this process (${process.pid})`
        : null;

net.Server.prototype.listen = function listen(...args) {
    if (!(this instanceof http.Server || this instanceof https.Server)) {
        return originalListen.apply(this, args);
    }
    net.Server.prototype.listen = originalListen;
    if (refusal !== null) {
        throw new Error(`${refusal}: no listening socket was handed over; refusing to listen on TCP (unix-socket-preload.js)`);
    }
    // listen(port, host, backlog, cb), listen(options, cb), ...: keep only the callback (the last
    // argument when it is a function) and the backlog if one is given.
    const callback = typeof args[args.length - 1] === 'function' ? args.pop() : undefined;
    const options = { fd: LISTEN_FD };
    const first = args[0];
    if (first !== null && typeof first === 'object' && Number.isInteger(first.backlog)) {
        options.backlog = first.backlog;
    } else if (args.length >= 3 && Number.isInteger(args[2])) {
        options.backlog = args[2];
    }
    this.address = () => ADDRESS;
    return callback === undefined ? originalListen.call(this, options) : originalListen.call(this, options, callback);
};
