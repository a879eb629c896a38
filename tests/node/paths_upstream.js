// An Express upstream for tests/test_proxy_paths.py: the ledger handler answers with a
// marker the test looks for, so a response carrying it proves the request reached the
// restricted handler. Express routes case-insensitively (/LEDGER/balance reaches it).
// Prints {"port": N} once listening on 127.0.0.1 (port from the OS); ends when stdin closes.
"use strict";
const express = require("express");

const app = express();
app.get(["/ledger", "/ledger/balance"], (req, res) => res.type("text/plain").send(`LEDGER-BALANCE-SECRET express ${req.originalUrl}`));
app.get("/public/*", (req, res) => res.type("text/plain").send(`public express ${req.originalUrl}`));
app.use((req, res) => res.status(404).type("text/plain").send(`not found express ${req.originalUrl}`));

const server = app.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
});
process.stdin.resume();
process.stdin.on("end", () => process.exit(0));
