"""Small models and tiny configs shared by the tests (built from code, never downloaded)."""

import torch


class TinyMLP(torch.nn.Module):
    def __init__(self, d_in=16, hidden=32, d_out=4):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyCNN(torch.nn.Module):
    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(2 * width)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def llama_config(**overrides):
    """A tiny ``LlamaConfig`` (hidden 64, 2 layers, 4 heads, 2 KV heads, 300 tokens)."""
    import transformers

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    return transformers.LlamaConfig(**{**kw, **overrides})


def gpt2_config(**overrides):
    """A tiny ``GPT2Config`` (hidden 64, 2 layers, 4 heads, 300 tokens, 64 positions)."""
    import transformers

    kw = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
    return transformers.GPT2Config(**{**kw, **overrides})


def bert_config(**overrides):
    """A tiny ``BertConfig`` (hidden 64, 2 layers, 4 heads, 128 intermediate, 300 tokens)."""
    import transformers

    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=300,
    )
    return transformers.BertConfig(**{**kw, **overrides})
