// unix-socket-preload.js - make a Node HTTP server (Theia's backend) listen on a Unix socket.
//
//   WSUP_IDE_SOCKET=/run/wsup/alice/ide.sock \
//     node --require /opt/theia/unix-socket-preload.js /opt/theia/lib/backend/main.js ...
//
// Theia's `--port` takes only a number, so this preload redirects the process's first
// `listen()` on an http/https server to the path named by WSUP_IDE_SOCKET, whatever port and
// host the caller asked for. The listen callback still fires (Theia logs its address then).
//
// - WSUP_IDE_SOCKET is deleted from process.env as soon as this file loads, so nothing the IDE
//   starts later (file watcher, terminals, language servers) inherits it.
// - Without the variable the preload fails closed: the first http/https listen() throws instead
//   of opening a TCP port that every tenant of the pod could reach.
// - A stale socket left by a previous run is removed first; any other kind of file at the path
//   is an error (never deleted).
// - The socket is created 0600 (umask held at 0177 around bind(), then chmod to be sure) before
//   the listen callback runs: only the IDE's own uid (and root, which the daemon runs as) can
//   connect. The parent directory is expected to be 0700 and owned by the user.
// - On exit the socket file is removed if it is still the one this process created.
'use strict';

const ENV_NAME = 'WSUP_IDE_SOCKET';
const socketPath = process.env[ENV_NAME];
delete process.env[ENV_NAME];

if (!socketPath) {
    const net = require('net');
    const http = require('http');
    const https = require('https');
    const originalListen = net.Server.prototype.listen;
    net.Server.prototype.listen = function listen(...args) {
        if (!(this instanceof http.Server || this instanceof https.Server)) {
            return originalListen.apply(this, args);
        }
        net.Server.prototype.listen = originalListen;
        throw new Error(`${ENV_NAME} is not set: refusing to listen on TCP (unix-socket-preload.js)`);
    };
} else {
    const fs = require('fs');
    const net = require('net');
    const http = require('http');
    const https = require('https');

    const originalListen = net.Server.prototype.listen;
    let redirected = false;
    let createdIno = null;

    const removeStale = () => {
        let st;
        try {
            st = fs.lstatSync(socketPath);
        } catch (err) {
            if (err.code === 'ENOENT') return;
            throw err;
        }
        if (!st.isSocket()) {
            throw new Error(`${ENV_NAME}=${socketPath} exists and is not a socket; refusing to replace it`);
        }
        fs.unlinkSync(socketPath);
    };

    net.Server.prototype.listen = function listen(...args) {
        if (redirected || !(this instanceof http.Server || this instanceof https.Server)) {
            return originalListen.apply(this, args);
        }
        redirected = true;
        net.Server.prototype.listen = originalListen;

        // listen(port, host, backlog, cb), listen(options, cb), listen(path, cb), ...: keep only
        // the callback (the last argument when it is a function) and the backlog if one is given.
        const callback = typeof args[args.length - 1] === 'function' ? args.pop() : undefined;
        const options = { path: socketPath };
        const first = args[0];
        if (first !== null && typeof first === 'object' && Number.isInteger(first.backlog)) {
            options.backlog = first.backlog;
        } else if (args.length >= 3 && Number.isInteger(args[2])) {
            options.backlog = args[2];
        }

        removeStale();
        // Runs before the caller's callback (registered below, by the original listen()).
        this.once('listening', () => {
            fs.chmodSync(socketPath, 0o600);
            try {
                createdIno = fs.statSync(socketPath).ino;
            } catch (_) {
                createdIno = null;
            }
        });
        // bind() happens synchronously inside listen() for a path: create the socket 0600.
        const previousUmask = process.umask(0o177);
        try {
            return callback === undefined
                ? originalListen.call(this, options)
                : originalListen.call(this, options, callback);
        } finally {
            process.umask(previousUmask);
        }
    };

    process.on('exit', () => {
        if (createdIno === null) return;
        try {
            if (fs.statSync(socketPath).ino === createdIno) fs.unlinkSync(socketPath);
        } catch (_) {
            // already gone, or replaced by someone else: leave it
        }
    });
}
