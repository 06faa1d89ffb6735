// The /keys page: the Copy button puts the new key (shown only on the page that made it) on the clipboard.

const key = document.getElementById("new-key");
const button = document.getElementById("copy-key");
const status = document.getElementById("copy-status");

function selectKey() {
  const range = document.createRange();
  range.selectNodeContents(key);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

async function copyKey() {
  try {
    if (!navigator.clipboard) throw new Error("no clipboard");
    await navigator.clipboard.writeText(key.textContent.trim());
    button.textContent = "Copied";
    button.dataset.state = "copied";
    status.textContent = "The key is on your clipboard.";
  } catch {
    // Refused (no permission, not a secure page): select it, so that Ctrl+C or Cmd+C copies it.
    selectKey();
    button.dataset.state = "failed";
    status.textContent = "Copying was not allowed: the key is selected, copy it with Ctrl+C (Cmd+C on a Mac).";
  }
}

if (key && button) {
  button.addEventListener("click", copyKey);
}
