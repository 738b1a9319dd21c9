"""What the fixture scripts share: a small English corpus and a byte-level BPE tokenizer
trained on it (for the RoBERTa, GPT-2 and Llama fixtures)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Marie Curie moved to Paris in 1891 to study physics and chemistry.",
    "John Smith lives in New York and works at a small café near the park.",
    "Berlin is the capital of Germany, and London is the capital of England.",
    "She ordered a coffee and a croissant at the café on the corner.",
    "The weather in London is lovely today, with sunshine and a light breeze.",
    "In 1969, two astronauts walked on the Moon for the first time.",
    "Where does the river flow? It flows from the mountains to the sea.",
    "Who wrote the letter? Anna wrote it last night before dinner.",
    "The museum opens at 9 in the morning and closes at 6 in the evening.",
    "Tokyo, Madrid and Rome are large cities with long histories.",
    "He bought 3 apples, 2 oranges and a loaf of bread at the market.",
    "Our team won the match after a very long and difficult season.",
    "The students read books in the library until it was dark outside.",
    "Please send the report to the manager before Friday afternoon.",
    "A man is eating food while a woman is playing the piano.",
    "The new movie is awesome, and everyone in the cinema laughed.",
    "Paul and Maria travelled by train from Vienna to Prague in spring.",
    "The company was founded in 2004 by three friends from university.",
    "Rain fell all day, so the children stayed inside and painted.",
    "What is the name of the tallest mountain in the world?",
    "Mount Everest is the tallest mountain, at 8849 metres above sea level.",
    "The bakery sells fresh bread, cakes and cookies every morning.",
    "Doctors and nurses worked through the night at the hospital.",
    "A small boat sailed across the lake under a bright blue sky.",
    "The old bridge in the city centre was rebuilt after the war.",
    "Emma asked her teacher a question about the history lesson.",
    "The train to Amsterdam leaves from platform 4 at half past ten.",
    "Music filled the streets during the summer festival in Lisbon.",
    "The engineer fixed the machine and tested it twice before lunch.",
    "Many birds fly south for the winter and return in the spring.",
    "The recipe needs two eggs, a cup of milk and some sugar.",
    "Thomas Edison is known for his work on the electric light bulb.",
    "The garden behind the house is full of roses and tall trees.",
    "After the meeting, they walked along the river to the old town.",
    "It was a cold night, but the fire kept everyone warm and happy.",
    "The capital of France is Paris, a city famous for its art.",
    "Scientists study the stars to learn how the universe began.",
    "The shop on Main Street closed early because of the storm.",
    "Every year, thousands of visitors come to see the ancient castle.",
]


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer
