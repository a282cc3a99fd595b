"""Stand-in for the config kwargs ConfigTester sets on plain configs (composite configs such as ours skip them)."""

config_common_kwargs = {"return_dict": False, "output_hidden_states": True, "output_attentions": True}
