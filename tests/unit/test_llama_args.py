"""llama_args: secret flag values hidden in argv, settings text and llama-server's output lines."""
from synapticllamas.llama.args import REDACTED, api_keys, redact_args, scrub, secrets


def test_secret_flag_values_are_hidden_in_an_argv():
    argv = ["llama-server", "--port", "8080", "--api-key", "K1,K2", "--api-key-file", "/etc/keys",
            "--ssl-key-file", "/etc/tls.key", "--ssl-cert-file", "/etc/tls.crt", "-hft", "hf_abc",
            "--hf-token=hf_def", "--db-password", "pw", "--image-max-tokens", "256", "--keep", "4"]
    assert redact_args(argv) == [
        "llama-server", "--port", "8080", "--api-key", REDACTED, "--api-key-file", REDACTED,
        "--ssl-key-file", REDACTED, "--ssl-cert-file", "/etc/tls.crt", "-hft", REDACTED,
        f"--hf-token={REDACTED}", "--db-password", REDACTED, "--image-max-tokens", "256", "--keep", "4"]
    assert argv[4] == "K1,K2", "the argv given is not changed"


def test_a_settings_string_is_redacted_and_left_alone_without_secrets():
    assert redact_args("-t 1 --api-key 'my key' --alias x") == f"-t 1 --api-key {REDACTED} --alias x"
    assert redact_args("-t 1  --alias 'a b'") == "-t 1  --alias 'a b'"      # as the user wrote it
    assert redact_args('--api-key "unclosed') == f"--api-key {REDACTED}"      # not shell syntax: per word
    assert redact_args("") == ""
    assert redact_args("--api-key") == "--api-key"                           # no value to hide


def test_api_keys_come_from_the_flag_and_the_key_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# a comment\nFILEKEY1\n\n  FILEKEY2  \n")
    assert api_keys(["x", "--api-key", "K1,K2", "--api-key-file", str(keys)]) == ["K1", "K2", "FILEKEY1",
                                                                                  "FILEKEY2"]
    assert api_keys(["x", "--api-key-file", str(tmp_path / "missing")]) == []
    assert api_keys(["x", "-t", "1"]) == []


def test_output_lines_lose_the_secrets_and_the_key_tail_llama_server_prints(tmp_path):
    hidden = secrets(["x", "--api-key=SECRET1,SECRET2", "--hf-token", "abc"])
    assert hidden[0] == "SECRET1,SECRET2" and "abc" not in hidden     # too short to be worth hiding
    assert scrub("error: invalid argument: --api-key=SECRET1,SECRET2", hidden) == \
        f"error: invalid argument: --api-key={REDACTED}"
    assert scrub("0.00.003.937 I srv  init_listene: api_keys: ****Y123", []) == \
        "0.00.003.937 I srv  init_listene: api_keys: ****"
    assert scrub("0.00.004.046 I srv  init_listene: api_keys: 4 keys loaded", []) == \
        "0.00.004.046 I srv  init_listene: api_keys: 4 keys loaded"
    assert scrub("abc and SECRET2", hidden) == f"abc and {REDACTED}"
