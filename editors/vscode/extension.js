// The d2graph extension for VS Code. Highlighting comes from the TextMate grammar that
// package.json contributes; this file starts `d2graph lsp` (the command in the setting
// `d2graph.server.command`) for diagnostics, quick fixes, hovers, definitions, completion,
// formatting and the outline. The server speaks over stdin/stdout.
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const [command, ...args] = vscode.workspace.getConfiguration("d2graph").get("server.command", ["d2graph", "lsp"]);
  client = new LanguageClient("d2graph", "d2graph", { command, args }, {
    documentSelector: [{ scheme: "file", language: "d2graph" }, { scheme: "untitled", language: "d2graph" }],
  });
  context.subscriptions.push(client);
  // A missing `d2graph` (or a missing lsp extra) shows in the "d2graph" output channel;
  // highlighting works without the server.
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
